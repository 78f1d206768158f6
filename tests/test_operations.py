"""Unattended operation end to end, all real processes (tests/topology.py: prefect server, dask scheduler,
a CPU and a GPU worker): ``labelrefinery deploy`` serves the deployments; the nightly deployment publishes a
version; a label edit is announced by ``labelrefinery watch`` as a Prefect event; the reprocess deployment's
trigger runs on it and publishes a version in which only the edited site was recomputed.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import geopandas as gpd
import pytest
import yaml

from tasks.demo import generate_demo_region
from tasks.store.reuse import read_keys
from tasks.store.versions import VersionStore
from tests.crs_spelling import assert_crs_spelled_as_fresh_process
from tests.topology import Topology, executable

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 300


def _region(root: Path) -> Path:
    generate_demo_region(root, scale=1, seed=7, sites_per_side=3)
    catalog = yaml.safe_load((REPO / "data_catalog.yaml").read_text(encoding="utf-8"))
    catalog["root"] = "."
    catalog["name"] = "ops-region"
    catalog["settings"]["learn"] = {"steps": 20}
    catalog["settings"]["schedule"] = {
        "cron": "30 3 * * *",
        "timezone": "Africa/Nairobi",
        "quiet_s": 0,
        "debounce_s": 5,
    }
    path = root / "data_catalog.yaml"
    path.write_text(yaml.safe_dump(catalog, sort_keys=False), encoding="utf-8")
    return path


def _wait_final(client, flow_run_id, timeout_s: float = RUN_TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = client.read_flow_run(flow_run_id)
        if run.state is not None and run.state.is_final():
            return run
        time.sleep(1.0)
    raise TimeoutError(f"flow run {flow_run_id} not finished after {timeout_s} s")


def _runs_of(client, deployment_id) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
    )


@pytest.fixture(scope="module")
def served(topology: Topology, tmp_path_factory):
    """``labelrefinery deploy`` serving one region's deployments against the topology."""
    root = tmp_path_factory.mktemp("ops_region")
    catalog = _region(root)
    log = open(root / "deploy.log", "wb")  # noqa: SIM115 (closed in teardown)
    proc = subprocess.Popen(
        [
            executable("labelrefinery"), "deploy", "--catalog", str(catalog),
            "--dask-address", topology.scheduler_address, "--no-watcher",
        ],
        cwd=root, env=topology.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        with topology.prefect_client() as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    nightly = client.read_deployment_by_name("nightly-refresh/ops-region")
                    reprocess = client.read_deployment_by_name("reprocess/ops-region")
                    break
                except Exception:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise AssertionError((root / "deploy.log").read_text()) from None
                    time.sleep(1.0)
        yield catalog, nightly, reprocess, root / "deploy.log"
    finally:
        import os
        import signal

        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_deployments_carry_the_catalog_schedule_and_the_label_trigger(served, topology):
    _, nightly, reprocess, _ = served
    cron = nightly.schedules[0].schedule
    assert (cron.cron, cron.timezone) == ("30 3 * * *", "Africa/Nairobi")
    for dep in (nightly, reprocess):  # one run at a time; later runs queue
        assert dep.global_concurrency_limit.limit == 1
        assert dep.concurrency_options.collision_strategy.value == "ENQUEUE"
    # serve creates the trigger's automation after the deployment it fires: wait for it
    deadline = time.monotonic() + 60
    with topology.prefect_client() as client:
        while True:
            autos = [a for a in client.read_automations() if "ops-region" in a.name]
            if autos or time.monotonic() > deadline:
                break
            time.sleep(1.0)
    assert len(autos) == 1
    trigger = autos[0].trigger
    assert trigger.expect == {"labelrefinery.labels.updated"}
    assert trigger.within.total_seconds() == 5  # a burst within 5 s gives one run
    assert str(reprocess.id) in autos[0].model_dump_json()


def test_nightly_then_label_event_reprocesses_only_the_changed_site(served, topology):
    catalog, nightly, reprocess, deploy_log = served
    store = VersionStore(catalog.parent)
    with topology.logs_on_failure(), topology.prefect_client() as client:
        run = client.create_flow_run_from_deployment(nightly.id)
        run = _wait_final(client, run.id)
        assert run.state.is_completed(), deploy_log.read_text()[-5000:]
        first = store.latest_id()
        assert first is not None

        labels_path = catalog.parent / "inputs" / "labels.parquet"
        labels = gpd.read_parquet(labels_path)
        multi = _a_multi_site(store.version_path(first), set(labels["site_id"]))
        row = labels.index[labels["site_id"] == multi][0]
        labels.loc[row, "geometry"] = labels.loc[row, "geometry"].buffer(-4.0)
        labels.to_parquet(labels_path)

        watch = subprocess.run(
            [executable("labelrefinery"), "watch", "--catalog", str(catalog), "--once"],
            cwd=catalog.parent, env=topology.env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert watch.returncode == 0, watch.stdout + watch.stderr
        event_id = re.search(r"event ([0-9a-f-]{36})", watch.stdout).group(1)
        assert "announced 1 changed site(s)" in watch.stdout

        deadline = time.monotonic() + 120
        while not (runs := _runs_of(client, reprocess.id)):
            assert time.monotonic() < deadline, "the trigger did not start a reprocess run"
            time.sleep(1.0)
        assert len(runs) == 1
        done = _wait_final(client, runs[0].id)
        assert done.state.is_completed(), deploy_log.read_text()[-5000:]
        assert done.parameters["trigger_event_id"] == event_id

    second = store.latest_id()
    assert second != first and store.list() == sorted([first, second])
    manifest = store.manifest(second)
    assert manifest["reuse"] == {"previous_version": first, "enabled": True, "refit": False}
    counts = manifest["counts"]
    assert counts["consensus_recomputed"] == 1 and counts["consensus_reused"] == counts["consensus_units"] - 1
    assert counts["ingest_recomputed"] == 0
    vdir = store.version_path(second)
    keys = read_keys(vdir, "consensus")
    assert keys[multi][1] == second
    others = {s: k for s, k in keys.items() if s != multi}
    assert others and all(computed_in == first for _, computed_in in others.values())
    assert manifest["placement"]["train"] == topology.gpu_worker_address
    # whatever ran before in a worker's threads, files are spelled alike (else their hashes, keys, change)
    assert assert_crs_spelled_as_fresh_process(store.dir) > 10

    again = subprocess.run(
        [executable("labelrefinery"), "watch", "--catalog", str(catalog), "--once"],
        cwd=catalog.parent, env=topology.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "watch: unchanged" in again.stdout


def _a_multi_site(vdir: Path, with_polygons: set[str]) -> str:
    from tasks.store.artifacts import read_table

    sites = read_table(vdir / "sites.parquet")
    multi = sites.loc[(sites["role"] == "multi") & sites["site_id"].isin(with_polygons), "site_id"]
    return str(multi.iloc[0])
