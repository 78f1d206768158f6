"""The scale-out topology as real processes on 127.0.0.1: ``prefect server``, ``dask scheduler``, one CPU
worker and one GPU worker — the services of ``infra/docker-compose.yml`` without Docker.

``running_topology(workdir)`` starts them and yields a :class:`Topology`; the session-scoped pytest
fixture ``topology`` wraps it (registered in ``tests/conftest.py``). Every process runs in its own process
group with its output in ``<workdir>/logs/<name>.log``, and every group is terminated on the way out,
also when startup or a test fails. Nothing here changes ``os.environ`` of the test process: subprocesses
get :attr:`Topology.env`, in-process Prefect clients get :meth:`Topology.prefect_client`.

The CPU worker advertises ``CPU=64`` and the GPU worker only ``GPU=1`` (as ``infra/docker-compose.yml``
does), so CPU stages never land on the GPU worker. Here the GPU worker gets ``CUDA_VISIBLE_DEVICES=""``:
torch runs on its CPU, and tests check *where* the GPU stages ran, not how fast.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 15.0


def executable(name: str) -> str:
    """A console script of the interpreter running the tests (the project's venv), else from PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name!r} is neither next to {sys.executable} nor on PATH")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def base_env(prefect_home: Path) -> dict[str, str]:
    """Offline Prefect/Dask settings shared by every process of the topology."""
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    env.update(
        {
            "PREFECT_HOME": str(prefect_home),
            "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
            "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.3",
            "DASK_DISTRIBUTED__WORKER__DAEMON": "false",  # torch may start processes inside a task
            "PYTHONUNBUFFERED": "1",
            # workers and the CLI import this checkout's flows/ and tasks/, whatever is installed
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
        }
    )
    return env


@dataclass
class _Processes:
    """Started subprocesses, each in its own process group, with their logs in ``log_dir``."""

    log_dir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        with open(self.log_dir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                cmd,
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: the nanny's worker and uvicorn go too
            )
        self.procs[name] = proc
        return proc

    def check_alive(self) -> None:
        dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
        if dead:
            raise RuntimeError(f"topology process(es) exited early {dead}\n{self.logs()}")

    def stop(self) -> None:
        """SIGTERM every group (newest first), then SIGKILL what is left after ``STOP_TIMEOUT_S``."""
        procs = list(reversed(self.procs.values()))
        for p in procs:
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for p in procs:
            with suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
        for p in procs:
            _signal_group(p, signal.SIGKILL)  # also children that outlived their leader
            with suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)

    def logs(self, tail_chars: int = 6000) -> str:
        parts = []
        for name in self.procs:
            text = (self.log_dir / f"{name}.log").read_text(encoding="utf-8", errors="replace")
            parts.append(f"----- {name} (last {tail_chars} chars) -----\n{text[-tail_chars:]}")
        return "\n".join(parts)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)  # start_new_session: the group id is the leader's pid


def _wait_until(what: str, ready: Callable[[], bool], procs: _Processes, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        procs.check_alive()
        try:
            if ready():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s\n{procs.logs()}")
        time.sleep(0.5)


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 (a local test server)
        return resp.status == 200


def _port_open(port: int) -> bool:
    with socket.create_connection((HOST, port), timeout=1):
        return True


@dataclass
class Topology:
    """A running topology; ``env`` is what a subprocess needs to use it (``PREFECT_API_URL`` included)."""

    api_url: str
    scheduler_address: str
    cpu_worker_address: str
    gpu_worker_address: str
    env: dict[str, str]
    workdir: Path
    log_dir: Path
    _procs: _Processes

    def logs(self, tail_chars: int = 6000) -> str:
        """The tail of every process's log (server, scheduler, workers)."""
        return self._procs.logs(tail_chars)

    @contextmanager
    def logs_on_failure(self) -> Iterator[None]:
        """Print the processes' logs when the block raises (pytest shows them with the failure)."""
        try:
            yield
        except BaseException:
            print(self.logs())
            raise

    def dask_client(self):
        """A ``distributed.Client`` of the scheduler (close it, e.g. ``with topology.dask_client() as c``)."""
        from distributed import Client

        return Client(self.scheduler_address, timeout=30, set_as_default=False)

    def task_stream(self) -> list[dict]:
        """Every Dask task finished since the topology started: ``key``, ``worker``, ``startstops``…"""
        with self.dask_client() as client:
            return client.get_task_stream(start=0)

    def prefect_client(self):
        """A synchronous Prefect client of this server (use as a context manager)."""
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api_url)


@contextmanager
def running_topology(workdir: Path, gpu_devices: str = "") -> Iterator[Topology]:
    """Start server, scheduler and the two workers under ``workdir``; stop them all on exit.

    ``gpu_devices`` is the GPU worker's ``CUDA_VISIBLE_DEVICES`` ("" = no CUDA device, torch on CPU).
    """
    workdir = Path(workdir)
    log_dir = workdir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = base_env(workdir / "prefect_home")
    Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    procs = _Processes(log_dir)
    try:
        api_port, sched_port = free_port(), free_port()
        api_url = f"http://{HOST}:{api_port}/api"
        procs.start(
            "prefect-server",
            [executable("prefect"), "server", "start", "--host", HOST, "--port", str(api_port), "--no-ui"],
            env,
        )
        env["PREFECT_API_URL"] = api_url  # everything after the server talks to it
        scheduler = f"tcp://{HOST}:{sched_port}"
        procs.start(
            "dask-scheduler",
            [
                executable("dask"), "scheduler", "--host", HOST, "--port", str(sched_port),
                "--dashboard-address", f"{HOST}:0",
            ],
            env,
        )  # fmt: skip
        _wait_until("dask scheduler", lambda: _port_open(sched_port), procs, START_TIMEOUT_S)
        worker = [
            executable("dask"), "worker", scheduler, "--host", HOST, "--nthreads", "1", "--nworkers", "1",
            "--no-dashboard", "--death-timeout", "60", "--local-directory", str(workdir / "dask"),
        ]  # fmt: skip
        procs.start("dask-worker-cpu", [*worker, "--name", "cpu", "--resources", "CPU=64"], env)
        procs.start(
            "dask-worker-gpu",
            [*worker, "--name", "gpu", "--resources", "GPU=1"],
            {**env, "CUDA_VISIBLE_DEVICES": gpu_devices},
        )
        _wait_until("prefect server", lambda: _http_ok(f"{api_url}/health"), procs, START_TIMEOUT_S)

        from distributed import Client

        with Client(scheduler, timeout=30, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=START_TIMEOUT_S)
            workers = client.scheduler_info(n_workers=-1)["workers"]
            client.get_task_stream(count=0)  # installs the scheduler's task-stream recorder from now on
        by_resource = {next(iter(w["resources"])): addr for addr, w in workers.items() if w["resources"]}
        procs.check_alive()
        yield Topology(
            api_url=api_url,
            scheduler_address=scheduler,
            cpu_worker_address=by_resource["CPU"],
            gpu_worker_address=by_resource["GPU"],
            env=env,
            workdir=workdir,
            log_dir=log_dir,
            _procs=procs,
        )
    finally:
        procs.stop()


@pytest.fixture(scope="session")
def topology(tmp_path_factory) -> Iterator[Topology]:
    """Prefect server + Dask scheduler + CPU worker + GPU worker on 127.0.0.1, shared by the session."""
    with running_topology(tmp_path_factory.mktemp("topology")) as topo:
        yield topo
