"""Where flows run: the Prefect API (a temporary local server unless PREFECT_API_URL is set) and the Dask
cluster (a LocalCluster from ``infra/dask_local.yaml`` unless an address is given).

Environment defaults are applied before Prefect is imported, because Prefect reads its settings once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

INFRA = Path(__file__).resolve().parents[1] / "infra"


def configure_environment(root: Path) -> None:
    """Offline-safe Prefect defaults; a PREFECT_HOME under the dataset root unless one is set; bounded
    native caches (inherited by LocalCluster workers; infra/ sets the same for external workers).

    GDAL's raster block cache defaults to 5 % of RAM in every process (1.2 GiB on a 24 GiB machine) and
    fills with a region's rasters, and Arrow's default mimalloc pool keeps freed pages: on a long-lived
    worker both made resident memory grow with the region (a 10x report stage alone peaked 310 MiB
    higher with them). Every raster here is read about once per stage, so a small cache costs nothing."""
    os.environ.setdefault("PREFECT_HOME", str(Path(root) / ".prefect"))
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.3")
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    os.environ.setdefault("DASK_DISTRIBUTED__WORKER__DAEMON", "false")
    os.environ.setdefault("GDAL_CACHEMAX", "128")  # MiB
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)


@contextmanager
def covered_by_parent_heartbeat() -> Iterator[None]:
    """Run a subflow without heartbeats of its own.

    A subflow runs in its parent's process, so the parent's heartbeats (Prefect's detection of crashed
    runs) already cover it; each flow run's heartbeat thread sleeps in one-second steps, and joining it
    delayed the end of every refresh subflow by up to a second (0.8 s measured).
    """
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def cluster_spec() -> dict:
    return yaml.safe_load((INFRA / "dask_local.yaml").read_text(encoding="utf-8"))


@contextmanager
def prefect_api() -> Iterator[str]:
    """Yield a Prefect API URL that Dask worker processes can share.

    Without PREFECT_API_URL every worker would try to start its own temporary server, so one is started
    here, in a subprocess, and its URL exported for the workers this process spawns.
    """
    url = os.environ.get("PREFECT_API_URL")
    if url:
        yield url
        return
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer()
    server.start(timeout=int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")))
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()  # send buffered run logs while the server is still up
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


def task_runner(dask_address: str | None = None, n_workers: int | None = None):
    """A DaskTaskRunner on an existing scheduler, or on a LocalCluster built from the infra spec."""
    from prefect_dask import DaskTaskRunner

    if dask_address:
        return DaskTaskRunner(address=dask_address)
    kwargs = dict(cluster_spec()["local"])
    if n_workers is not None:
        kwargs["n_workers"] = n_workers
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs)


def cluster_resources() -> dict[str, float]:
    """Resources the running flow's Dask workers advertise, summed ({} outside a Dask flow run)."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    client = getattr(getattr(ctx, "task_runner", None), "client", None) if ctx else None
    if client is None:
        return {}
    totals: dict[str, float] = {}
    # ask the scheduler directly: Client.scheduler_info() returns a cache that the client's periodic
    # refresh can overwrite with a copy without per-worker information
    info = client.sync(client.scheduler.identity, n_workers=-1)
    for w in info["workers"].values():
        for k, v in (w.get("resources") or {}).items():
            totals[k] = totals.get(k, 0) + v
    return totals


def stage_resources(kind: str) -> dict:
    """The Dask resources a stage of this kind asks for.

    A GPU stage asks for ``GPU`` only where some worker advertises one; on a CPU-only cluster it takes a
    CPU slot and torch runs on the CPU (a ``GPU`` request nobody can satisfy would wait forever).
    """
    spec = cluster_spec()["stage_resources"]
    if kind == "gpu" and not cluster_resources().get("GPU"):
        return dict(spec["cpu"])
    return dict(spec[kind])
