"""Incremental report: parts with unchanged inputs are taken over, and the result equals a fresh build.

A copy of the tiny demo region gets a first version ``v0`` (ingest, consensus, small label-issue and
pseudo-label artifacts, report). One site's labels are then edited, ``v1`` is ingested and its consensus
carried from ``v0`` (as ``reprocess`` does), and the report is built twice on identical copies of ``v1``:
reusing ``v0`` and from scratch (``Reuse(v0, enabled=False)``). ``metrics.json`` must be equal but for the
version's id and time, and every figure and thumbnail byte for byte.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dask
import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
import yaml

from schemas.catalog import load_catalog
from tasks.consensus.run import run_consensus_stage
from tasks.ingest.stage import run_ingest
from tasks.report import run_report_stage
from tasks.store.artifacts import read_table, write_table
from tasks.store.reuse import Reuse, read_keys

REPO = Path(__file__).resolve().parents[1]
VOLATILE = ("version_id", "created_at")  # name the build, not the data


def _learn_artifacts(vdir: Path) -> None:
    """Small label_issues / pseudo-label artifacts in the published schemas (the learn stages are slow)."""
    sites = read_table(vdir / "sites.parquet").sort_values("site_id")
    labelled = sites[sites["role"] == "multi"].iloc[:2]
    free = sites[sites["role"] == "unlabelled"].iloc[:2]

    def square(row, k):
        _, _, c, _, _, f = row["transform"]
        return shapely.box(c + 40 * k + 8, f - 120, c + 40 * k + 100, f - 8)

    issues = pd.DataFrame(
        [
            {
                "issue_id": f"{r.site_id}/crowd/{k}",
                "site_id": r.site_id,
                "labeller_id": "crowd",
                "kind": "spurious_field",
                "rank": 2 * i + k + 1,
                "score": 9.0 - 2 * i - k,
                "area_m2": 500.0,
                "n_pixels": 30,
                "mean_p_field": 0.1,
                "consensus_agreement": 1.0,
                "labeller_polygon_id": None,
                "evidence": "{}",
                "geometry": square(r._asdict(), k),
                "crs": r.crs,
            }
            for i, r in enumerate(labelled.itertuples())
            for k in range(2)  # two issues of one site and labeller: one set of panels
        ]
    )
    write_table("label_issues", issues, vdir / "label_issues")
    pseudo = pd.DataFrame(
        [
            {
                "polygon_id": f"{r.site_id}-p{k}",
                "site_id": r.site_id,
                "class": "field",
                "confidence": 0.95 - 0.3 * k,
                "source": "unlabelled",
                "kept": k == 0,
                "geometry": square(r._asdict(), k),
                "crs": r.crs,
            }
            for r in free.itertuples()
            for k in range(2)
        ]
    )
    write_table("pseudo_labels", pseudo, vdir / "pseudo_labels")
    (vdir / "pseudo_probabilities").mkdir(exist_ok=True)
    for r in free.itertuples():
        prof = {
            "driver": "GTiff",
            "width": int(r.width),
            "height": int(r.height),
            "count": 3,
            "dtype": "float32",
            "crs": r.crs,
            "transform": rasterio.Affine(*r.transform[:6]),
        }
        bg = np.linspace(0, 1, r.width * r.height, dtype=np.float32).reshape(r.height, r.width)
        with rasterio.open(vdir / "pseudo_probabilities" / f"{r.site_id}.tif", "w", **prof) as dst:
            dst.write(np.stack([bg, (1 - bg) / 2, (1 - bg) / 2]))


def _stages(cat, vdir: Path, reuse: Reuse | None) -> dict:
    with dask.config.set(scheduler="synchronous"):
        ing = run_ingest(cat, vdir, reuse=reuse)
        run_consensus_stage(cat, vdir, reuse=reuse)
    _learn_artifacts(vdir)
    return {"inputs": ing.inputs, "code_version": {"git_sha": "test"}}


@pytest.fixture(scope="module")
def versions(tmp_path_factory, demo_root) -> dict:
    root = tmp_path_factory.mktemp("report_reuse") / "region"
    shutil.copytree(demo_root / "inputs", root / "inputs")
    raw = yaml.safe_load((REPO / "data_catalog.yaml").read_text(encoding="utf-8"))
    raw["root"] = "."
    (root / "data_catalog.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    cat = load_catalog(root / "data_catalog.yaml")
    v0 = root / "versions" / "20260101T000000000Z-v0"
    prov0 = _stages(cat, v0, None)
    run_report_stage(cat, v0, None, provenance=prov0)
    # edit one multi-labeller site's labels, then ingest + consensus as a reprocess does
    path = root / "inputs" / "labels.parquet"
    labels = gpd.read_parquet(path)
    sites = read_table(v0 / "sites.parquet")
    multi = sorted(set(sites.loc[sites["role"] == "multi", "site_id"]) & set(labels["site_id"]))
    row = labels.index[labels["site_id"] == multi[-1]][0]
    labels.loc[row, "geometry"] = labels.loc[row, "geometry"].buffer(-2.0)
    labels.to_parquet(path)
    v1 = root / "versions" / "20260102T000000000Z-v1"
    prov1 = _stages(cat, v1, Reuse(str(v0), refit=False))
    return {"catalog": cat, "v0": v0, "v1": v1, "prov1": prov1, "prov0": prov0, "edited": multi[-1]}


def _build(versions, name: str, base: str, enabled: bool, prov: str):
    """Copy version ``base``'s stage outputs to ``name`` and build its report against v0."""
    vdir = versions[base].parent / name
    shutil.copytree(versions[base], vdir, ignore=shutil.ignore_patterns("report", "metrics.json"))
    (vdir / "reuse_keys" / "report.parquet").unlink(missing_ok=True)
    v0 = versions["v0"]
    res = run_report_stage(
        versions["catalog"], vdir, v0, provenance=versions[prov], reuse=Reuse(str(v0), enabled=enabled)
    )
    return vdir, res


def _metrics(vdir: Path) -> dict:
    m = json.loads((vdir / "metrics.json").read_text(encoding="utf-8"))
    return {k: v for k, v in m.items() if k not in VOLATILE}


def _assert_same_report(a: Path, b: Path) -> None:
    assert _metrics(a) == _metrics(b)
    files = sorted(p.relative_to(a / "report") for p in (a / "report").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b / "report") for p in (b / "report").rglob("*") if p.is_file())
    for f in files:
        if f.suffix != ".html":  # pages name their version
            assert (a / "report" / f).read_bytes() == (b / "report" / f).read_bytes(), f


def _linked(vdir: Path, v0: Path, rel: str) -> bool:
    a, b = vdir / "report" / rel, v0 / "report" / rel
    return b.exists() and a.stat().st_ino == b.stat().st_ino


def test_unchanged_version_reuses_every_part_and_equals_a_fresh_build(versions):
    reused, res = _build(versions, "same_reused", "v0", True, "prov0")
    fresh, ref = _build(versions, "same_fresh", "v0", False, "prov0")
    _assert_same_report(reused, fresh)
    c = res.counts
    assert c["report_units"] == ref.counts["report_units"] > 10
    assert c["report_recomputed"] == 0 and ref.counts["report_reused"] == 0
    m = _metrics(reused)
    assert m["properties"]["sample_sites"] and m["assets"]["issues"] and m["assets"]["pseudo"]
    v0 = versions["v0"]
    assert all(_linked(reused, v0, p) for p in m["assets"]["figures"].values())
    assert all(_linked(reused, v0, e["image"]) for e in m["assets"]["riskiest"])
    assert not any(_linked(fresh, v0, e["image"]) for e in m["assets"]["riskiest"])
    keys = read_keys(reused, "report")
    assert {k for k, _ in keys.values()} == {k for k, _ in read_keys(fresh, "report").values()}
    assert keys.keys() == read_keys(v0, "report").keys()


def test_changed_site_recomputes_what_reads_it_and_equals_a_fresh_build(versions):
    reused, res = _build(versions, "v1_reused", "v1", True, "prov1")
    fresh, _ = _build(versions, "v1_fresh", "v1", False, "prov1")
    _assert_same_report(reused, fresh)
    keys = read_keys(reused, "report")
    again = {u for u, (_, where) in keys.items() if where == reused.name}
    assert 0 < res.counts["report_recomputed"] == len(again) < len(keys)
    # the scenes and sites did not change: what reads only them is reused; the edited site's consensus
    # risk changed, so the risk map is drawn again
    assert again.isdisjoint({"band_histograms", "figure/bands", "figure/map_coverage", "figure/tile_quality"})
    assert "figure/map_risk" in again
    edited = versions["edited"]
    m = _metrics(reused)
    assert m["changes"]["sites_changed"] == [edited]  # label digests: taken over for every other site
    if edited in {e["site_id"] for e in _metrics(reused)["assets"]["riskiest"]}:
        assert f"thumbs/riskiest/{edited}" in again


def test_a_changed_scene_recomputes_band_histograms(versions):
    prov = json.loads(json.dumps(versions["prov0"]))
    rec = next(r for r in prov["inputs"] if r["dataset"] == "imagery")
    rec["hash"] = "0" * 32  # as if the scene file had been replaced
    versions["prov_scene"] = prov
    reused, _ = _build(versions, "scene_changed", "v0", True, "prov_scene")
    again = {u for u, (_, where) in read_keys(reused, "report").items() if where == reused.name}
    assert {"band_histograms", "properties"} <= again
    assert any(u.startswith("thumbs/") for u in again)
    # the file's bytes did not really change: the recomputed histograms are the same data, so their
    # figure (keyed by what it draws) is still taken over
    assert "figure/bands" not in again
