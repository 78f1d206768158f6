"""Incremental reprocessing: after the labels of one site change, how much of a full refresh does a
reprocess redo, and does it publish the same outputs as a full recompute?

On one demo region (default 10x: 1,280 sites), against one Dask LocalCluster (infra/dask_local.yaml) and one
temporary Prefect server shared by every run, so start-up costs are not counted in any of them:

1. full: ``refresh(reuse=False, refit=True)`` — the baseline (every site, model trained);
2. one multi-labeller site's polygon is edited in the inputs;
3. reprocess: ``flows.operations.reprocess`` — change detection + ``refresh(reuse=True, refit=False)``;
4. recompute: ``refresh(reuse=False, refit=False)`` on the same inputs — what the reprocess must equal;
5. with ``--more N``: N more rounds of 2-3 on other sites, on the same warm cluster (the reprocess's wall
   time varies by seconds from run to run on a shared VM: their median is the steadier figure).

Reports wall time, sites recomputed per stage, peak memory of the process tree, and the artifact-by-artifact
comparison of 3 and 4. Usage: python benchmarks/bench_incremental.py [--scale 10] [--root DIR] [--more N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import TreeMemory, compare_versions, demo_region, machine, timed  # noqa: E402


def _edit_one_site(catalog_path: Path, version_dir: Path, nth: int = 0) -> str:
    import geopandas as gpd

    from tasks.store.artifacts import read_table

    sites = read_table(version_dir / "sites.parquet")
    path = catalog_path.parent / "inputs" / "labels.parquet"
    labels = gpd.read_parquet(path)
    multi = sites.loc[sites["role"] == "multi", "site_id"]
    site = str(multi.iloc[len(sites) // 7 % 10])
    if nth:  # further rounds: other multi-labeller sites with polygons to edit
        drawn = multi[multi.isin(set(labels["site_id"]))]
        site = str(drawn.iloc[97 * nth % len(drawn)])
    row = labels.index[labels["site_id"] == site][0]
    labels.loc[row, "geometry"] = labels.loc[row, "geometry"].buffer(-5.0)
    labels.to_parquet(path)
    return site


def _recomputed(manifest: dict) -> dict[str, int]:
    c = manifest["counts"]
    return {k.removesuffix("_recomputed"): v for k, v in c.items() if k.endswith("_recomputed")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--root", type=Path, help="Region folder (generated there when missing).")
    ap.add_argument("--more", type=int, default=0, help="Further edit + reprocess rounds (other sites).")
    args = ap.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix=f"bench_incremental_{args.scale}x_"))
    catalog = demo_region(root, args.scale)
    info = {"machine": machine(), "scale": args.scale, "root": str(root)}

    from distributed import LocalCluster
    from prefect_dask import DaskTaskRunner

    from flows.operations import reprocess
    from flows.refresh import refresh
    from flows.runtime import cluster_spec, configure_environment, prefect_api
    from tasks.store.versions import VersionStore

    configure_environment(root)
    store = VersionStore(root)
    mem = TreeMemory()
    runs = {}
    with prefect_api(), LocalCluster(**cluster_spec()["local"]) as cluster:
        addr = cluster.scheduler_address
        flow = refresh.with_options(task_runner=DaskTaskRunner(address=addr))
        with mem.measure(), timed() as t:
            full = flow(str(catalog), reuse=False, refit=True)
        runs["full"] = {"wall_s": t["s"], "peak_mib": mem.peak_mib, "version": full["version_id"]}
        site = _edit_one_site(catalog, Path(full["path"]))
        info["edited_site"] = site
        time.sleep(1)
        with mem.measure(), timed() as t:
            inc = reprocess(str(catalog), addr)
        runs["reprocess"] = {"wall_s": t["s"], "peak_mib": mem.peak_mib, "version": inc["version_id"]}
        with mem.measure(), timed() as t:
            again = flow(str(catalog), reuse=False, refit=False)
        runs["recompute"] = {"wall_s": t["s"], "peak_mib": mem.peak_mib, "version": again["version_id"]}
        latest = Path(again["path"])
        for n in range(1, args.more + 1):
            _edit_one_site(catalog, latest, nth=n)
            time.sleep(1)
            with mem.measure(), timed() as t:
                more = reprocess(str(catalog), addr)
            runs[f"reprocess{n + 1}"] = {
                "wall_s": t["s"],
                "peak_mib": mem.peak_mib,
                "version": more["version_id"],
            }
            latest = Path(more["path"])
    for r in runs.values():
        m = store.manifest(r["version"])
        r["stage_seconds"] = m["stage_seconds"]
        r["recomputed"] = _recomputed(m)
        r["units"] = {k.removesuffix("_units"): v for k, v in m["counts"].items() if k.endswith("_units")}
    info["runs"] = runs
    info["equal"] = compare_versions(
        store.version_path(runs["reprocess"]["version"]), store.version_path(runs["recompute"]["version"])
    )
    info["reprocess_over_full_wall"] = runs["reprocess"]["wall_s"] / runs["full"]["wall_s"]
    info["reprocess_over_recompute_wall"] = runs["reprocess"]["wall_s"] / runs["recompute"]["wall_s"]
    walls = sorted(r["wall_s"] for k, r in runs.items() if k.startswith("reprocess"))
    info["reprocess_median_over_full_wall"] = walls[len(walls) // 2] / runs["full"]["wall_s"]
    out = (
        REPO
        / "benchmarks"
        / "results"
        / f"bench_incremental-{args.scale}x-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=2), encoding="utf-8")

    print(f"region {args.scale}x at {root}; edited site {site}; machine {info['machine']}")
    print(f"{'run':<10} {'wall s':>8} {'peak MiB':>9}  recomputed / units per stage")
    for name, r in runs.items():
        per = ", ".join(f"{k} {v}/{r['units'].get(k, '?')}" for k, v in r["recomputed"].items())
        print(f"{name:<10} {r['wall_s']:8.1f} {r['peak_mib']:9.0f}  {per}")
    print(
        f"reprocess / full wall: {info['reprocess_over_full_wall']:.1%}; "
        f"reprocess / recompute (no training) wall: {info['reprocess_over_recompute_wall']:.1%}"
    )
    if args.more:
        print(
            f"median of {len(walls)} reprocesses {walls[len(walls) // 2]:.1f} s "
            f"({info['reprocess_median_over_full_wall']:.1%} of the full refresh); range "
            f"{walls[0]:.1f}-{walls[-1]:.1f} s"
        )
    differ = {k: v for k, v in info["equal"].items() if v != "equal"}
    print("outputs equal to the recompute:", differ if differ else "all")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
