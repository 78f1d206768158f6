"""Ingestion throughput next to a plain rasterio read, and Prefect orchestration overhead of ``refresh``.

    .venv/bin/python benchmarks/bench_ingest.py [--root DIR] [--scale 1] [--sites-per-side 8] [--repeats 3]
        [--skip-refresh] [--out FILE.json]

Without ``--root`` the default demo region (scale 1, 8 sites per side: 2 scenes, 128 sites) is generated
into a temporary folder with ``labelrefinery demo --generate-only``; with ``--root`` an existing region
(one with ``data_catalog.yaml``) is reused, or generated there. Every figure is the median of
``--repeats`` runs (min and max are in the JSON); every file is read once before anything is timed.

Throughput, all in one process and on the same files:

* plain: ``rasterio.open(p).read()`` of every scene, whole file, all bands (GDAL defaults, one thread).
  MB = bytes of the decoded arrays (10**6 bytes).
* ours: ``run_ingest`` (the whole ingest stage) on Dask's local threads, then through a
  ``distributed.LocalCluster(n_workers=2, threads_per_worker=1)`` client. Its pixel work is the
  ``tiles`` phase (``IngestResult.timings["tiles"]``: read the site windows of every scene and
  summarise them into the tiles table). Two byte counts:
    - tile MB: decoded bytes of the site windows (bands x rows x cols x itemsize, windows clipped to
      the scene, summed over (site, scene) pairs). This is "MB of pixels read and summarised", and the
      ratio target (>= 0.8) applies to ``tile MB/s of the tiles phase / plain MB/s``.
    - scene MB: decoded bytes of the whole scenes. ``scene-equivalent ratio`` = plain seconds / tiles
      seconds, i.e. how long ours takes to get through the same files compared with a plain read
      (sites cover only part of a scene, so this is the more lenient figure).
  The whole stage (``run_ingest`` wall, which also validates and normalises labels and writes the
  tables) is reported as tile MB / wall for context; it is not what the target measures.

Prefect overhead of ``refresh`` (``--skip-refresh`` leaves it out):

* no Prefect: ``run_ingest`` called from this process through a Client on the same LocalCluster, after
  the warm flow runs, next to the ingest stage's own seconds inside the flow. (A plain ``run_ingest`` on
  local threads is in the throughput table.) The other stages are not rerun outside Prefect: their
  manifest timers are the stage work.
* cold: one ``flows.refresh.run_refresh(catalog)``, exactly what ``labelrefinery refresh`` runs: it starts
  a temporary Prefect server and a LocalCluster from ``infra/dask_local.yaml``, runs the flow, stops both.
* warm: the same flow with the start-up done once, outside the timed runs: ``flows.runtime.prefect_api()``
  (temporary server, timed) and ``distributed.LocalCluster(**cluster_spec()["local"])`` (timed), then
  1 + ``--repeats`` flow runs through ``DaskTaskRunner(address=...)``; the first run (fresh workers
  import the stage modules) is reported on its own, the steady-state figure is the median of the rest.
  For each run: flow wall = the ``refresh(...)`` call as the caller sees it; stage work = the manifest's
  ``stage_seconds`` (the stage functions' own timers, on the workers) along the flow's longest chain of
  dependent stages (``FLOW_DEPS``: label_issues and pseudo_labels run side by side after train, so the
  plain sum of the stages exceeds the wall time);
  orchestration overhead = (flow wall - stage work) / flow wall. That overhead is everything that is
  not stage work: Prefect flow/task run bookkeeping through the API, Dask submission and result
  transfer, catalog load, version lock/draft/publish and log flushing. Start-up (server, cluster) is
  NOT in it; the cold run shows it, as (cold wall - stage work) / cold wall.

Memory: ``peak tree RSS`` samples the summed RSS of this process and all its descendants (Dask workers,
the Prefect server) every 50 ms during each phase; ``main HWM`` is this process's exact peak RSS
(VmHWM, reset per phase through /proc/self/clear_refs).

Results go to ``benchmarks/results/bench_ingest-<time>.json`` (gitignored) unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MB = 1e6


# --------------------------------------------------------------------------------------------- machine
def _spin(n: int = 3_000_000) -> float:
    t0 = time.perf_counter()
    x = 0
    for i in range(n):
        x += i
    return time.perf_counter() - t0


def effective_cores() -> float:
    """How many cores this run really gets now: one busy loop alone vs two in parallel processes.

    On a shared machine other jobs take cores; a 2-thread pipeline cannot beat a 1-thread baseline then.
    """
    import multiprocessing as mp

    one = min(_spin() for _ in range(2))
    with mp.get_context("spawn").Pool(2) as pool:
        pool.map(_spin, [100_000] * 2)  # start-up, untimed
        t0 = time.perf_counter()
        pool.map(_spin, [3_000_000] * 2)
        two = time.perf_counter() - t0
    return round(2 * one / two, 2)


def machine() -> dict:
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    try:
        free_g = subprocess.run(["free", "-g"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        free_g = ""
    import dask
    import distributed
    import rasterio

    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu,
        "mem_total_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "free_g": free_g,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "rasterio": rasterio.__version__,
        "gdal": rasterio.__gdal_version__,
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "effective_cores_start": effective_cores(),
    }


# ---------------------------------------------------------------------------------------------- memory
def _hwm_mb() -> float:
    m = re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(m.group(1)) / 1024 if m else float("nan")


def _reset_hwm() -> None:
    with suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _tree_rss() -> int:
    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        with suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_info().rss
    return total


class Memory:
    """Per-phase peak RSS of the process tree (sampled) and of this process (exact)."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.phases: dict[str, dict] = {}

    @contextmanager
    def phase(self, name: str):
        _reset_hwm()
        start = _tree_rss()
        peak = [start]
        stop = threading.Event()

        def sample():
            while not stop.wait(self.interval):
                peak[0] = max(peak[0], _tree_rss())

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join()
            peak[0] = max(peak[0], _tree_rss())
            self.phases[name] = {
                "tree_rss_start_mb": round(start / MB, 1),
                "peak_tree_rss_mb": round(peak[0] / MB, 1),
                "main_hwm_mb": round(_hwm_mb() * 2**20 / MB, 1),
            }


# ---------------------------------------------------------------------------------------------- region
def ensure_region(root: Path, scale: int, sites_per_side: int) -> float:
    """Generate the demo region unless ``root`` already has one; returns seconds spent generating.

    A reused region gets the repository's current catalog (with ``root: "."``), as ``labelrefinery demo``
    writes it, so an older region still matches the catalog schema of the code being measured.
    """
    if (root / "inputs" / "imagery").is_dir():
        catalog = yaml.safe_load((REPO / "data_catalog.yaml").read_text(encoding="utf-8"))
        catalog["root"] = "."
        (root / "data_catalog.yaml").write_text(yaml.safe_dump(catalog, sort_keys=False), encoding="utf-8")
        return 0.0
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "flows.cli", "demo", "--root", str(root), "--scale", str(scale)]
    cmd += ["--sites-per-side", str(sites_per_side), "--generate-only"]
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def pixel_accounting(catalog) -> dict:
    """Decoded bytes of the whole scenes and of the site windows ``run_ingest`` reads."""
    from tasks.ingest.imagery import find_scenes, open_scene, site_windows
    from tasks.ingest.labels import normalise_sites
    from tasks.ingest.readers import read_vector

    s, ds = catalog.settings, catalog.datasets
    scenes = [
        open_scene(p, s.ingest.band_names, s.ingest.required_bands)
        for p in find_scenes(catalog.input_path("imagery"))
    ]
    sp = catalog.input_path("input_sites")
    sites = normalise_sites(read_vector(sp, ds["input_sites"].columns, ds["input_sites"].constants), sp)
    pairs = site_windows(sites, scenes, sp)
    by_id = {sc.scene_id: sc for sc in scenes}
    tile_bytes = 0
    for p in pairs.itertuples(index=False):
        sc = by_id[p.scene_id]
        rows = max(0, min(p.row_off + p.height, sc.height) - max(p.row_off, 0))
        cols = max(0, min(p.col_off + p.width, sc.width) - max(p.col_off, 0))
        tile_bytes += sc.count * rows * cols * np.dtype(sc.dtype).itemsize
    scene_bytes = sum(sc.count * sc.height * sc.width * np.dtype(sc.dtype).itemsize for sc in scenes)
    return {
        "paths": [sc.path for sc in scenes],
        "n_scenes": len(scenes),
        "n_sites": int(pairs["site_id"].nunique()),
        "n_tiles": len(pairs),
        "scene_mb": scene_bytes / MB,
        "tile_mb": tile_bytes / MB,
        "file_mb": sum(Path(sc.path).stat().st_size for sc in scenes) / MB,
    }


# ----------------------------------------------------------------------------------------------- timing
def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def tree_cpu() -> float:
    """CPU seconds (user + system) used so far by this process and its live descendants (Dask workers)."""
    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        with suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def plain_read(paths: list[str]) -> tuple[float, int, float]:
    import rasterio

    c0, t0 = tree_cpu(), time.perf_counter()
    nbytes = 0
    for p in paths:
        with rasterio.open(p) as src:
            nbytes += src.read().nbytes
    return time.perf_counter() - t0, nbytes, tree_cpu() - c0


_TILES_CPU: list[float] = []


def _count_tiles_cpu() -> None:
    """Wrap the ingest stage's tiles phase (unchanged) to also record the CPU seconds it takes."""
    from tasks.ingest import stage

    inner = stage._all_tile_stats

    def wrapped(*args, **kwargs):
        c0 = tree_cpu()
        try:
            return inner(*args, **kwargs)
        finally:
            _TILES_CPU.append(tree_cpu() - c0)

    stage._all_tile_stats = wrapped


def timed_ingest(catalog) -> tuple[float, dict]:
    from tasks.ingest.stage import run_ingest

    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        t0 = time.perf_counter()
        res = run_ingest(catalog, tmp)
        wall = time.perf_counter() - t0
    return wall, res.timings


def ingest_runs(catalog, repeats: int) -> dict:
    walls, tiles, cpus = [], [], []
    for _ in range(repeats):
        wall, timings = timed_ingest(catalog)
        walls.append(wall)
        tiles.append(timings["tiles"])
        cpus.append(_TILES_CPU[-1])
    return {"wall_s": summary(walls), "tiles_s": summary(tiles), "tiles_cpu_s": summary(cpus)}


def throughput_rows(acc: dict, plain: dict, plain_cpu: dict, runs: dict[str, dict]) -> dict:
    plain_mbps = acc["scene_mb"] / plain["median"]
    rows = {
        "plain rasterio read": {
            "seconds": plain["median"],
            "cpu_s": plain_cpu["median"],
            "mb": acc["scene_mb"],
            "mb_s": plain_mbps,
        }
    }
    for name, r in runs.items():
        ts, ws = r["tiles_s"]["median"], r["wall_s"]["median"]
        rows[f"ours {name}: tiles phase"] = {
            "seconds": ts,
            "cpu_s": r["tiles_cpu_s"]["median"],
            "mb": acc["tile_mb"],
            "mb_s": acc["tile_mb"] / ts,
            "ratio_tile": acc["tile_mb"] / ts / plain_mbps,
            "ratio_scene_equiv": acc["scene_mb"] / ts / plain_mbps,
        }
        rows[f"ours {name}: whole run_ingest"] = {
            "seconds": ws,
            "mb": acc["tile_mb"],
            "mb_s": acc["tile_mb"] / ws,
            "ratio_tile": acc["tile_mb"] / ws / plain_mbps,
            "ratio_scene_equiv": acc["scene_mb"] / ws / plain_mbps,
        }
    return rows


# ------------------------------------------------------------------------------------------------ refresh
# The refresh flow's stage dependencies (flows/refresh.py): label_issues and pseudo_labels both follow
# train and run at the same time, so the stage work a run waits for is its longest dependent chain, not
# the sum of its stages (the sum exceeds the flow's wall time).
FLOW_DEPS = {
    "ingest": (),
    "consensus": ("ingest",),
    "train": ("consensus",),
    "pseudo_labels": ("train",),
    "label_issues": ("train",),
    "report": ("label_issues", "pseudo_labels"),
}


def critical_path(stage_seconds: dict[str, float], deps: dict[str, tuple] = FLOW_DEPS) -> float:
    """Seconds of stage work on the longest dependent chain of stages.

    A stage the table does not know is counted as if it ran after all the others; if it in fact ran
    beside another, the overhead is understated by that overlap (the printed stage list shows it).
    """
    done: dict[str, float] = {}

    def finish(name: str) -> float:
        if name not in done:
            before = [finish(d) for d in deps.get(name, ()) if d in stage_seconds]
            done[name] = max(before, default=0.0) + float(stage_seconds[name])
        return done[name]

    known = max((finish(n) for n in stage_seconds if n in deps), default=0.0)
    return known + sum(float(v) for n, v in stage_seconds.items() if n not in deps)


def _stage_seconds(manifest: dict) -> float:
    return critical_path(manifest["stage_seconds"])


def _manifest(result: dict) -> dict:
    return json.loads((Path(result["path"]) / "manifest.json").read_text(encoding="utf-8"))


def plain_ingest(catalog, repeats: int) -> dict:
    """``run_ingest`` called directly (no Prefect) on the active Dask scheduler: wall and its own timers."""
    walls, own = [], []
    for _ in range(repeats):
        wall, timings = timed_ingest(catalog)
        walls.append(wall)
        own.append(sum(timings.values()))
    return {"wall_s": summary(walls), "stage_s": summary(own)}


def refresh_cold(catalog_path: str) -> dict:
    from flows.refresh import run_refresh

    t0 = time.perf_counter()
    result = run_refresh(catalog_path, reuse=False)  # every run does all the work (a full refresh)
    wall = time.perf_counter() - t0
    m = _manifest(result)
    return {
        "wall_s": wall,
        "flow_body_s": m["flow_seconds_before_publish"],
        "stage_s": _stage_seconds(m),
        "stage_seconds": m["stage_seconds"],
    }


def refresh_warm(catalog_path: str, catalog, repeats: int) -> dict:
    from distributed import Client, LocalCluster
    from prefect_dask import DaskTaskRunner

    from flows.refresh import refresh
    from flows.runtime import cluster_spec, prefect_api

    out: dict = {"runs": []}
    t0 = time.perf_counter()
    with prefect_api():
        out["server_start_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        cluster = LocalCluster(**cluster_spec()["local"])
        out["cluster_start_s"] = time.perf_counter() - t1
        try:
            for _ in range(1 + repeats):
                runner = DaskTaskRunner(address=cluster.scheduler_address)
                t = time.perf_counter()
                result = refresh.with_options(task_runner=runner)(catalog_path, reuse=False)
                wall = time.perf_counter() - t
                m = _manifest(result)
                out["runs"].append(
                    {
                        "wall_s": wall,
                        "flow_body_s": m["flow_seconds_before_publish"],
                        "stage_s": _stage_seconds(m),
                        "stage_seconds": m["stage_seconds"],
                    }
                )
            with Client(cluster):  # the ingest stage without Prefect, on the same (now warm) workers
                out["plain_ingest"] = plain_ingest(catalog, repeats)
        finally:
            t2 = time.perf_counter()
            cluster.close()
            out["cluster_close_s"] = time.perf_counter() - t2
        t3 = time.perf_counter()
    out["server_stop_s"] = time.perf_counter() - t3
    return out


# ------------------------------------------------------------------------------------------------- output
def fmt_table(headers: list[str], rows: list[list], title: str) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        return "  ".join(
            v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths, strict=True))
        )

    return "\n".join([title, line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in cells)])


def _f(x, nd=3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=None, help="demo region to reuse (or generate there)")
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--sites-per-side", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-refresh", action="store_true", help="throughput only, no Prefect")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    repeats = max(1, args.repeats)
    t_start = time.perf_counter()

    tmp = None
    if args.root is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-ingest-region-")
        root = Path(tmp.name)
    else:
        root = args.root.resolve()
        root.mkdir(parents=True, exist_ok=True)
    gen_s = ensure_region(root, args.scale, args.sites_per_side)
    catalog_path = str(root / "data_catalog.yaml")

    from flows.runtime import configure_environment  # before Prefect is imported anywhere

    configure_environment(root)
    from schemas.catalog import load_catalog

    info = machine()
    catalog = load_catalog(catalog_path)
    acc = pixel_accounting(catalog)
    mem = Memory()
    results: dict = {"machine": info, "region": {"root": str(root), "generate_s": gen_s}}
    results["region"].update({k: v for k, v in acc.items() if k != "paths"})

    # Warm the OS cache (every input file) and the imports; nothing here is timed.
    plain_read(acc["paths"])
    _count_tiles_cpu()
    timed_ingest(catalog)

    # 1. throughput ----------------------------------------------------------------------------------
    with mem.phase("plain read"):
        reads = [plain_read(acc["paths"]) for _ in range(repeats)]
    plain = summary([t for t, _, _ in reads])
    plain_cpu = summary([c for _, _, c in reads])
    assert abs(reads[0][1] / MB - acc["scene_mb"]) < 1e-6
    with mem.phase("ingest local threads"):
        local = ingest_runs(catalog, repeats)

    from distributed import Client, LocalCluster

    with mem.phase("ingest LocalCluster(2x1)"):
        t0 = time.perf_counter()
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as lc:
            cluster_start = time.perf_counter() - t0
            with Client(lc):
                timed_ingest(catalog)  # workers import the stage modules
                dist = ingest_runs(catalog, repeats)
    dist["cluster_start_s"] = cluster_start
    rows = throughput_rows(acc, plain, plain_cpu, {"local threads": local, "LocalCluster 2x1": dist})
    results["throughput"] = {
        "plain_s": plain,
        "plain_cpu_s": plain_cpu,
        "ingest_local": local,
        "ingest_localcluster": dist,
        "table": rows,
    }

    # 2. refresh overhead ------------------------------------------------------------------------------
    if not args.skip_refresh:
        with mem.phase("refresh cold (run_refresh)"):
            cold = refresh_cold(catalog_path)
        with mem.phase("refresh warm (server+cluster up)"):
            warm = refresh_warm(catalog_path, catalog, repeats)
        plain_ing = warm["plain_ingest"]
        results["refresh"] = {"cold": cold, "warm": warm}
    results["memory"] = mem.phases
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    info["effective_cores_end"] = effective_cores()
    results["bench_seconds"] = time.perf_counter() - t_start

    # ---------------------------------------------------------------------------------------------- print
    print(
        f"region: {acc['n_scenes']} scenes, {acc['n_sites']} sites, {acc['n_tiles']} tiles; "
        f"scene pixels {acc['scene_mb']:.1f} MB decoded ({acc['file_mb']:.1f} MB on disk), "
        f"site-window pixels {acc['tile_mb']:.1f} MB ({acc['tile_mb'] / acc['scene_mb']:.0%} of the scenes); "
        f"median of {repeats}"
    )
    trows = [
        [
            name,
            _f(r["seconds"]),
            _f(r.get("cpu_s")),
            f"{r['mb']:.1f}",
            f"{r['mb_s']:.0f}",
            _f(r.get("ratio_tile"), 2),
            _f(r.get("ratio_scene_equiv"), 2),
        ]
        for name, r in rows.items()
    ]
    print()
    print(
        fmt_table(
            ["throughput", "s", "cpu s", "MB", "MB/s", "ratio", "scene-eq ratio"],
            trows,
            "ingestion throughput (ratio = our MB/s / plain MB/s; target >= 0.8 on the tiles phase)",
        )
    )
    print(f"LocalCluster(2x1) start: {dist['cluster_start_s']:.2f} s (not in the figures above)")
    tl = rows["ours local threads: tiles phase"]
    idle = tl["cpu_s"] / min(info["nproc"], 2)
    idle_ratio = acc["tile_mb"] / idle / (acc["scene_mb"] / plain_cpu["median"])
    results["throughput"]["idle_estimate"] = {"tiles_s": idle, "ratio_tile": idle_ratio}
    print(
        "cpu s = CPU seconds of the process tree (less sensitive to other jobs than wall time). "
        f"Idle-machine estimate: tiles phase {tl['cpu_s']:.3f} CPU-s over 2 threads ~ {idle:.3f} s vs plain "
        f"{plain_cpu['median']:.3f} CPU-s -> ratio ~ {idle_ratio:.2f} (assumes perfect 2-thread scaling)"
    )

    if not args.skip_refresh:
        w = warm["runs"]
        steady = w[1:] or w
        sw = statistics.median(r["wall_s"] for r in steady)
        ss = statistics.median(r["stage_s"] for r in steady)
        sb = statistics.median(r["flow_body_s"] for r in steady)
        ov = statistics.median((r["wall_s"] - r["stage_s"]) / r["wall_s"] for r in steady)
        first_ov = (w[0]["wall_s"] - w[0]["stage_s"]) / w[0]["wall_s"]
        cold_ov = (cold["wall_s"] - cold["stage_s"]) / cold["wall_s"]
        pw = plain_ing["wall_s"]["median"]
        ingest_in_flow = statistics.median(r["stage_seconds"]["ingest"] for r in steady)
        results["refresh"]["summary"] = {
            "stages": list(w[0]["stage_seconds"]),
            "steady_flow_wall_s": sw,
            "steady_stage_s": ss,
            "steady_flow_body_s": sb,
            "steady_orchestration_overhead": ov,
            "first_run_overhead": first_ov,
            "cold_overhead_incl_startup": cold_ov,
            "plain_ingest_same_cluster_s": pw,
            "steady_ingest_stage_in_flow_s": ingest_in_flow,
        }
        rrows = [
            [
                "refresh warm, steady (median)",
                _f(sw, 2),
                _f(ss, 2),
                _f(ingest_in_flow, 2),
                _f(sb, 2),
                f"{ov:.1%}",
            ],
            [
                "refresh warm, 1st run (fresh workers)",
                _f(w[0]["wall_s"], 2),
                _f(w[0]["stage_s"], 2),
                _f(w[0]["stage_seconds"]["ingest"], 2),
                _f(w[0]["flow_body_s"], 2),
                f"{first_ov:.1%}",
            ],
            [
                "refresh cold: run_refresh (all start-up)",
                _f(cold["wall_s"], 2),
                _f(cold["stage_s"], 2),
                _f(cold["stage_seconds"]["ingest"], 2),
                _f(cold["flow_body_s"], 2),
                f"{cold_ov:.1%}",
            ],
            [
                "run_ingest alone, no Prefect, same cluster",
                _f(pw, 2),
                "-",
                _f(plain_ing["stage_s"]["median"], 2),
                "-",
                "-",
            ],
        ]
        print()
        print(
            fmt_table(
                ["refresh", "wall s", "critical stage work s", "of it ingest", "flow body s", "overhead"],
                rrows,
                "Prefect orchestration (overhead = (wall - critical-path stage work) / wall; target <= 10%)",
            )
        )
        print(
            f"one-off start-up: Prefect temporary server {warm['server_start_s']:.2f} s, "
            f"LocalCluster(infra spec) {warm['cluster_start_s']:.2f} s; teardown: cluster "
            f"{warm['cluster_close_s']:.2f} s, server {warm['server_stop_s']:.2f} s"
        )
        print(
            f"per steady run, {sw - ss:.2f} s is not stage work: {sw - sb:.2f} s outside the flow body "
            f"(Prefect flow-run engine, task runner client, teardown) + {sb - ss:.2f} s inside it "
            "(catalog, lock/draft, task submission and results, manifest, publish)"
        )
        print(f"stages in the flow: {', '.join(w[0]['stage_seconds'])}")

    mrows = [
        [name, f"{m['tree_rss_start_mb']:.0f}", f"{m['peak_tree_rss_mb']:.0f}", f"{m['main_hwm_mb']:.0f}"]
        for name, m in mem.phases.items()
    ]
    print()
    print(fmt_table(["memory (MB)", "tree RSS at start", "peak tree RSS", "main HWM"], mrows, "memory"))

    tput = rows["ours local threads: tiles phase"]
    tput_d = rows["ours LocalCluster 2x1: tiles phase"]
    lines = [
        "README figures",
        f"machine: {info['nproc']} cores ({info['cpu_model']}), {info['mem_total_gib']} GiB RAM; "
        f"Python {info['python']}, GDAL {info['gdal']}, dask {info['dask']}; "
        f"load average {info['loadavg_start'][0]} -> {info['loadavg_end'][0]}, cores free for this run "
        f"{info['effective_cores_start']} -> {info['effective_cores_end']} (other jobs on the machine)",
        f"region: demo scale {args.scale}, {args.sites_per_side} sites/side = {acc['n_scenes']} scenes, "
        f"{acc['n_sites']} sites; median of {repeats}",
        f"plain rasterio full read: {rows['plain rasterio read']['mb_s']:.0f} MB/s",
        f"ingest tiles phase, local threads: {tput['mb_s']:.0f} MB/s of tile pixels, ratio "
        f"{tput['ratio_tile']:.2f} (scene-equivalent {tput['ratio_scene_equiv']:.2f}); target >= 0.8",
        f"ingest tiles phase, LocalCluster 2x1: {tput_d['mb_s']:.0f} MB/s, ratio {tput_d['ratio_tile']:.2f} "
        f"(scene-equivalent {tput_d['ratio_scene_equiv']:.2f})",
        f"whole run_ingest, local threads: {local['wall_s']['median']:.2f} s "
        f"(tiles phase {local['tiles_s']['median']:.2f} s)",
    ]
    if not args.skip_refresh:
        s = results["refresh"]["summary"]
        lines += [
            f"refresh orchestration overhead (warm, steady): {s['steady_orchestration_overhead']:.1%} of "
            f"{s['steady_flow_wall_s']:.2f} s "
            f"({s['steady_flow_wall_s'] - s['steady_stage_s']:.2f} s per run); target <= 10%",
            f"refresh cold incl. start-up (run_refresh): {s['cold_overhead_incl_startup']:.1%} of "
            f"{cold['wall_s']:.2f} s (server {warm['server_start_s']:.1f} s + cluster "
            f"{warm['cluster_start_s']:.1f} s start-up)",
        ]
    peak = max(m["peak_tree_rss_mb"] for m in mem.phases.values())
    lines.append(
        "peak tree RSS: "
        + ", ".join(f"{n} {m['peak_tree_rss_mb']:.0f} MB" for n, m in mem.phases.items())
        + f" (max {peak:.0f} MB)"
    )
    print()
    print("\n".join(lines))
    results["readme_figures"] = lines

    out = args.out or REPO / "benchmarks" / "results" / f"bench_ingest-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    print(f"\nresults: {out} ({results['bench_seconds']:.0f} s)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
