"""Shared pieces of the refresh-level benchmarks: demo regions, process-tree memory, version comparison."""

from __future__ import annotations

import platform
import threading
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": psutil.cpu_count(),
        "mem_total_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_1m_at_start": round(psutil.getloadavg()[0], 2),
    }


def demo_region(root: Path, scale: int, seed: int = 0, learn: dict | None = None) -> Path:
    """Generate the demo region at ``root`` unless it is there; (re)write its catalog; return its path."""
    from tasks.demo import generate_demo_region

    root = Path(root)
    if not (root / "inputs" / "labels.parquet").exists():
        generate_demo_region(root, scale=scale, seed=seed, sites_per_side=8)
    catalog = yaml.safe_load((REPO / "data_catalog.yaml").read_text(encoding="utf-8"))
    catalog["root"] = "."
    if learn:
        catalog["settings"]["learn"] = learn
    path = root / "data_catalog.yaml"
    path.write_text(yaml.safe_dump(catalog, sort_keys=False), encoding="utf-8")
    return path


class TreeMemory:
    """Peak resident memory of this process and all its descendants (Dask workers included), sampled.

    Besides the peak of the sum, keeps each role's own peak (``main``: the root process; ``server``: the
    Prefect server; ``worker``: the largest Dask worker process; ``other``), so a growth can be traced.
    """

    def __init__(self, root_pid: int | None = None, every_s: float = 0.2, trace: Path | None = None):
        self.proc = psutil.Process(root_pid)
        self.every_s = every_s
        self.peak = 0
        self.role_peaks: dict[str, int] = {}
        self.trace = trace  # with a path: every sample's per-process RSS (UTC time, pid, role, MiB)
        self._rows: list[str] = []

    def _role(self, p: psutil.Process) -> str:
        if p.pid == self.proc.pid:
            return "main"
        cmd = " ".join(p.cmdline())
        if "prefect" in cmd and ("server" in cmd or "uvicorn" in cmd):
            return "server"
        if "spawn_main" in cmd or "distributed" in cmd or "dask" in cmd:
            return "worker"
        return "other"

    def rss(self) -> int:
        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            with suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                r = p.memory_info().rss
                total += r
                role = self._role(p)
                self.role_peaks[role] = max(self.role_peaks.get(role, 0), r)
                if self.trace is not None:
                    now = time.strftime("%H:%M:%S", time.gmtime()) + f".{int(time.time() * 10) % 10}"
                    self._rows.append(f"{now}\t{p.pid}\t{role}\t{r / 2**20:.0f}")
        return total

    @contextmanager
    def measure(self):
        self.role_peaks = {}
        self.peak = self.rss()
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                with suppress(psutil.NoSuchProcess):
                    self.peak = max(self.peak, self.rss())
                stop.wait(self.every_s)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        try:
            yield self
        finally:
            stop.set()
            t.join()
            if self.trace is not None:
                self.trace.write_text("utc\tpid\trole\trss_mib\n" + "\n".join(self._rows) + "\n")

    @property
    def peak_mib(self) -> float:
        return self.peak / 2**20

    @property
    def role_peaks_mib(self) -> dict[str, float]:
        return {k: round(v / 2**20, 1) for k, v in sorted(self.role_peaks.items())}


@contextmanager
def timed():
    out = {}
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out["s"] = time.perf_counter() - t0


# Artifacts that name their own version or time (and so always differ between two versions).
VERSION_SPECIFIC = {"metrics", "report", "model"}


def compare_versions(a: Path, b: Path) -> dict[str, str]:
    """Per artifact of version ``a``: "equal" or what differs in ``b`` (tables row for row, rasters pixel
    for pixel, other files byte for byte); report pages and metrics name their version and are skipped."""
    import json

    import rasterio

    from tasks.store.artifacts import read_table

    manifest = json.loads((a / "manifest.json").read_text(encoding="utf-8"))
    out = {}
    for name, rec in sorted(manifest["artifacts"].items()):
        if name in VERSION_SPECIFIC:
            continue
        pa, pb = a / rec["path"], b / rec["path"]
        if not pb.exists():
            out[name] = "missing"
            continue
        try:
            if rec["path"].endswith(".parquet") or (pa.is_dir() and any(pa.glob("*.parquet"))):
                ta, tb = read_table(pa), read_table(pb)
                ta = ta.drop(columns=["computed_in"], errors="ignore")
                tb = tb.drop(columns=["computed_in"], errors="ignore")
                pd.testing.assert_frame_equal(ta.reset_index(drop=True), tb.reset_index(drop=True))
            elif pa.is_dir():
                fa, fb = sorted(p.name for p in pa.glob("*.tif")), sorted(p.name for p in pb.glob("*.tif"))
                if fa != fb:
                    raise AssertionError(f"{len(set(fa) ^ set(fb))} files differ")
                for f in fa:
                    with rasterio.open(pa / f) as ra, rasterio.open(pb / f) as rb:
                        np.testing.assert_array_equal(ra.read(), rb.read(), err_msg=f)
            elif pa.read_bytes() != pb.read_bytes():
                raise AssertionError("bytes differ")
            out[name] = "equal"
        except AssertionError as exc:
            out[name] = str(exc).splitlines()[0][:200] if str(exc) else "differs"
    return out
