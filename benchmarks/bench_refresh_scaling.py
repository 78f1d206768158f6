"""Full refresh scaling: wall time and peak memory at 1x, 10x (100x if asked) demo regions, with 1 and 2
Dask workers.

Each run is exactly what a user runs — ``labelrefinery refresh --full --workers N`` in a fresh process
(temporary Prefect server, LocalCluster from infra/dask_local.yaml) — timed from outside; peak memory is
the sampled RSS of that process and all its children (workers, server). Targets (issue #6): time linear in
sites, memory flat, >= 1.6x speed-up from 1 to 2 workers.
Usage: python benchmarks/bench_refresh_scaling.py [--scales 1 10] [--workers 1 2] [--base DIR] [--trace]
(--trace: every process's RSS per sample, UTC-stamped, in <region>/refresh_w<N>_rss.tsv, to line up with
the refresh log.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import TreeMemory, demo_region, machine  # noqa: E402


def run_refresh(catalog: Path, workers: int, trace: bool = False) -> dict:
    cli = str(Path(sys.executable).parent / "labelrefinery")  # the installed entry point
    cmd = [cli, "refresh", "--catalog", str(catalog), "--full"]
    cmd += ["--workers", str(workers)]
    log = catalog.parent / f"refresh_w{workers}.log"
    with open(log, "wb") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
        trace_to = catalog.parent / f"refresh_w{workers}_rss.tsv" if trace else None
        mem = TreeMemory(proc.pid, every_s=0.25, trace=trace_to)
        with mem.measure():
            rc = proc.wait()
        wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"refresh failed ({rc}); see {log}")
    from tasks.store.versions import VersionStore

    store = VersionStore(catalog.parent)
    m = store.manifest(store.latest_id())
    return {
        "workers": workers,
        "wall_s": wall,
        "peak_mib": mem.peak_mib,
        "role_peaks_mib": mem.role_peaks_mib,
        "stage_seconds": m["stage_seconds"],
        "sites": m["counts"]["sites"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--base", type=Path, help="Folder for the regions (reused when present).")
    ap.add_argument(
        "--trace", action="store_true", help="Write each process's RSS per sample beside the refresh log."
    )
    args = ap.parse_args()
    base = args.base or Path(tempfile.mkdtemp(prefix="bench_scaling_"))
    info = {"machine": machine(), "runs": []}
    for scale in args.scales:
        catalog = demo_region(base / f"x{scale}", scale)
        for w in args.workers:
            r = {"scale": scale, **run_refresh(catalog, w, args.trace)}
            info["runs"].append(r)
            print(f"{scale:>4}x {r['sites']:>6} sites  {w} worker(s): {r['wall_s']:7.1f} s, "
                  f"peak {r['peak_mib']:6.0f} MiB (each process's own peak: {r['role_peaks_mib']})  "
                  f"stages {r['stage_seconds']}", flush=True)  # fmt: skip
    runs = {(r["scale"], r["workers"]): r for r in info["runs"]}
    lo, hi = min(args.scales), max(args.scales)
    summary = {}
    for w in args.workers:
        if (lo, w) in runs and (hi, w) in runs and hi != lo:
            a, b = runs[(lo, w)], runs[(hi, w)]
            summary[f"time_per_site_{hi}x_over_{lo}x_w{w}"] = (b["wall_s"] / b["sites"]) / (
                a["wall_s"] / a["sites"]
            )
            summary[f"peak_memory_{hi}x_over_{lo}x_w{w}"] = b["peak_mib"] / a["peak_mib"]
    for s in args.scales:
        if (s, 1) in runs and (s, 2) in runs:
            summary[f"speedup_1_to_2_workers_{s}x"] = runs[(s, 1)]["wall_s"] / runs[(s, 2)]["wall_s"]
    info["summary"] = summary
    out = REPO / "benchmarks" / "results" / f"bench_refresh_scaling-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=2), encoding="utf-8")
    for k, v in summary.items():
        print(f"{k}: {v:.2f}")
    print(f"machine {info['machine']}; saved {out}")


if __name__ == "__main__":
    main()
