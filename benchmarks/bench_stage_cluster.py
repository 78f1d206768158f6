"""One stage alone (ingest, consensus or label_issues) on the refresh's 2-worker LocalCluster: wall time,
stage timers, peak RSS of each process. Run it on two regions back to back (e.g. 10x and 100x) to see how
one stage scales without the rest of a refresh, or on two checkouts to compare code on the same inputs: run
each checkout's own copy of this script (``--code`` swaps only the stage task's code; the Dask tasks it
fans out still run the code the workers import, this script's checkout, which fails or mixes versions when
those tasks changed).

The stage runs inside one Dask task, as in a refresh (its fan-out goes to the cluster through
``tasks.parallel.cluster_scheduler``), without Prefect. ``ingest`` writes into OUT (emptied first);
``consensus`` reads the ingest tables in OUT (a version folder, or an ingest OUT) and writes next to them;
``label_issues`` reads a whole version's tables and rasters in OUT and replaces its label-issue tables (give
it a hard-linked copy of a published version, ``cp -al``: every table is written as a new file, so the
published one keeps its own).
Usage: python benchmarks/bench_stage_cluster.py ingest|consensus|label_issues REGION_ROOT OUT [...]
    [--code CHECKOUT] [--trace FILE.tsv]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import TreeMemory, machine  # noqa: E402
from flows.runtime import cluster_spec  # noqa: E402


def run_stage(code: str, stage: str, catalog_path: str, out: str) -> tuple[dict, dict]:
    sys.path.insert(0, code)
    from schemas.catalog import load_catalog
    from tasks.parallel import cluster_scheduler

    catalog = load_catalog(catalog_path)
    with cluster_scheduler():
        if stage == "ingest":
            from tasks.ingest.stage import run_ingest

            result = run_ingest(catalog, out)
        elif stage == "consensus":
            from tasks.consensus.run import run_consensus_stage

            result = run_consensus_stage(catalog, out)
        else:
            from tasks.learn.label_issues import run_label_issues_stage

            result = run_label_issues_stage(catalog, out)
    return result.timings, result.counts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", choices=["ingest", "consensus", "label_issues"])
    ap.add_argument("pairs", nargs="+", help="REGION_ROOT OUT, repeated")
    ap.add_argument(
        "--code",
        default=str(REPO),
        help="Checkout whose code the stage task runs (its fan-out runs this one's).",
    )
    ap.add_argument("--trace", type=Path, help="Write every sample's per-process RSS here (last pair's run).")
    args = ap.parse_args()
    if len(args.pairs) % 2:
        ap.error("give REGION_ROOT OUT pairs")
    from distributed import Client, LocalCluster

    # the worker settings `refresh` gives its LocalCluster (flows/runtime.py)
    os.environ.update(
        {"GDAL_CACHEMAX": "128", "ARROW_DEFAULT_MEMORY_POOL": "system", "PYTHONPATH": args.code}
    )
    info = {"machine": machine(), "stage": args.stage, "code": args.code, "runs": []}
    for root, out in zip(args.pairs[::2], args.pairs[1::2], strict=True):
        if args.stage == "ingest":
            shutil.rmtree(out, ignore_errors=True)
        with LocalCluster(**dict(cluster_spec()["local"])) as cluster, Client(cluster) as client:
            mem = TreeMemory(every_s=0.25, trace=args.trace)
            t0 = time.perf_counter()
            with mem.measure():
                catalog = str(Path(root) / "data_catalog.yaml")
                job = client.submit(
                    run_stage, args.code, args.stage, catalog, out, resources={"CPU": 1}, pure=False
                )
                timings, counts = job.result()
            run = {
                "root": root,
                "wall_s": time.perf_counter() - t0,
                "timings": timings,
                "counts": counts,
                "peak_mib": mem.peak_mib,
                "role_peaks_mib": mem.role_peaks_mib,
            }
        info["runs"].append(run)
        print(
            f"{args.stage} {root}: {run['wall_s']:.1f} s, peak {run['peak_mib']:.0f} MiB "
            f"(each process's own peak: {run['role_peaks_mib']}), timers "
            f"{ {k: round(v, 1) for k, v in timings.items()} }",
            flush=True,
        )
    path = REPO / "benchmarks" / "results" / f"bench_stage_cluster-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
    print(f"machine {info['machine']}; saved {path}")


if __name__ == "__main__":
    main()
