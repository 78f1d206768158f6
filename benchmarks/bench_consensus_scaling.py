"""Consensus stage scaling: 1x vs 10x demo sites — wall time per site and peak memory.

Each size runs ingest once (setup, untimed), then the consensus stage in a fresh child process so its
peak RSS (ru_maxrss) is the stage's own. ``--root DIR`` keeps the ingested regions under DIR and reuses
them on later runs (a 10x region takes about a minute to generate and ingest).
Usage: python benchmarks/bench_consensus_scaling.py [--scales 1 10] [--root DIR] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _child(catalog: str, version_dir: str) -> None:
    import dask

    from schemas.catalog import load_catalog
    from tasks.consensus.run import run_consensus_stage

    dask.config.set(scheduler="threads", num_workers=2)
    t0 = time.perf_counter()
    res = run_consensus_stage(load_catalog(catalog), version_dir)
    wall = time.perf_counter() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"wall_s": wall, "peak_mib": peak_mib, "timings": res.timings, "counts": res.counts}))


def _prepare(root: Path, scale: int, batch_size: int) -> tuple[str, str]:
    vdir = root / "version"
    done = root / ".prepared"
    if done.exists() and done.read_text() == str(batch_size):  # kept from an earlier run (--root)
        return str(root / "data_catalog.yaml"), str(vdir)
    shutil.rmtree(root, ignore_errors=True)
    from schemas.catalog import load_catalog
    from tasks.demo import generate_demo_region
    from tasks.ingest.stage import run_ingest

    generate_demo_region(root, scale=scale, seed=0, sites_per_side=8)
    cat = yaml.safe_load((REPO / "data_catalog.yaml").read_text())
    cat["root"] = "."
    cat["settings"]["ingest"]["batch_size"] = batch_size
    (root / "data_catalog.yaml").write_text(yaml.safe_dump(cat, sort_keys=False))
    run_ingest(load_catalog(root / "data_catalog.yaml"), vdir)
    done.write_text(str(batch_size))
    return str(root / "data_catalog.yaml"), str(vdir)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    ap.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="Sites per batch; small enough that every scale has more batches than threads, so each "
        "scale holds the same number of batches in memory at once (with one batch, 1x would hold less).",
    )
    ap.add_argument("--root", type=Path, help="keep (and reuse) the ingested regions under this folder")
    ap.add_argument("--repeat", type=int, default=1, help="runs of the stage per scale")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(*args.child)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = args.root or Path(tmp)
        for scale in args.scales:
            catalog, vdir = _prepare(base / f"x{scale}", scale, args.batch_size)
            for run in range(args.repeat):
                cmd = [sys.executable, __file__, "--child", catalog, vdir]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                r["scale"], r["run"] = scale, run
                r["sites"] = r["counts"]["consensus_sites"]
                rows.append(r)
                print(
                    f"scale {scale:>3}: {r['sites']:>5} labelled sites  {r['wall_s']:7.2f} s  "
                    f"{1000 * r['wall_s'] / r['sites']:6.1f} ms/site  peak {r['peak_mib']:7.0f} MiB",
                    flush=True,
                )
    if len({r["scale"] for r in rows}) >= 2:
        lo, hi = min(r["scale"] for r in rows), max(r["scale"] for r in rows)
        a = min((r for r in rows if r["scale"] == lo), key=lambda r: r["wall_s"] / r["sites"])
        b = min((r for r in rows if r["scale"] == hi), key=lambda r: r["wall_s"] / r["sites"])
        per_site = (b["wall_s"] / b["sites"]) / (a["wall_s"] / a["sites"])
        print(f"time per site {b['scale']}x vs {a['scale']}x: {per_site:.2f} (1.0 = linear)")
        print(f"peak memory {b['scale']}x vs {a['scale']}x: {b['peak_mib'] / a['peak_mib']:.2f} (1.0 = flat)")
    out_dir = REPO / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "consensus_scaling.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
