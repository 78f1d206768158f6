"""Incremental report: parts with unchanged inputs are taken over, and the result equals a fresh build.

A copy of the tiny demo region gets a first version ``v0`` (ingest, consensus, small label-issue and
pseudo-label artifacts, report). One site's labels are then edited, ``v1`` is ingested and its consensus
carried from ``v0`` (as ``reprocess`` does), and the report is built twice on identical copies of ``v1``:
reusing ``v0`` and from scratch (``Reuse(v0, enabled=False)``). ``metrics.json`` must be equal but for the
version's id and time, and every figure and thumbnail byte for byte.
"""

from __future__ import annotations

import hashlib
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
from tasks.report import plots, run_report_stage
from tasks.store.artifacts import read_table, write_table
from tasks.store.reuse import Reuse, content_key, read_keys, site_label_keys

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


def _risks(m: dict) -> dict:
    return {r["site_id"]: r["mean_risk"] for r in m["consensus"]["sites"] if r.get("role") != "gold"}


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
    # risk changed, so the risk map is drawn again when that changed the colour it is painted in
    assert again.isdisjoint({"band_histograms", "figure/bands", "figure/map_coverage", "figure/tile_quality"})
    edited = versions["edited"]
    m = _metrics(reused)
    sites = read_table(reused / "sites.parquet")
    painted = [plots.risk_map_colours(sites, _risks(mm)) for mm in (_metrics(versions["v0"]), m)]
    assert _risks(m)[edited] != _risks(_metrics(versions["v0"]))[edited]
    assert ("figure/map_risk" in again) == (content_key(painted[0]) != content_key(painted[1]))
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


def _old_kind_copy(versions, name: str, keep_record: bool) -> Path:
    """A copy of v0 whose metrics.json holds label fingerprints of the kind reports wrote before they
    recorded one (per-site digests of other content); without ingest's per-site record when not
    ``keep_record``."""
    old = versions["v0"].parent / name
    shutil.copytree(versions["v0"], old)
    m = json.loads((old / "metrics.json").read_text(encoding="utf-8"))
    fp = m["fingerprints"]
    del fp["kind"]
    fp["site_labels"] = {s: hashlib.blake2b(s.encode(), digest_size=8).hexdigest() for s in fp["site_labels"]}
    (old / "metrics.json").write_text(json.dumps(m), encoding="utf-8")
    if not keep_record:
        (old / "reuse_keys" / "site_labels.parquet").unlink()
    return old


def test_changes_names_exactly_the_edited_site_with_the_pipelines_site_keys(versions):
    reused, _ = _build(versions, "v1_keys", "v1", True, "prov1")
    m = _metrics(reused)
    fp = m["fingerprints"]
    assert fp["kind"] == "site_label_keys"
    tables = (read_table(reused / "labels"), read_table(reused / "assignments.parquet"))
    computed = site_label_keys(*tables)
    # the keys every stage compares, for every site with a completed assignment or a polygon
    done = tables[1][tables[1]["status"] == "completed"]
    labelled = set(done["site_id"].astype(str)) | set(tables[0]["site_id"].astype(str))
    assert fp["site_labels"] == {s: computed[s] for s in sorted(labelled)}
    ch = m["changes"]
    assert ch["sites_changed"] == [versions["edited"]] and ch["n_sites_changed"] == 1
    assert ch["n_sites_newly_labelled"] == ch["n_sites_no_longer_labelled"] == 0
    assert "site_labels_note" not in ch
    # without ingest's record the keys are computed from the tables: the same fingerprints
    bare = versions["v1"].parent / "v1_keys_bare"
    shutil.copytree(reused, bare, ignore=shutil.ignore_patterns("report", "metrics.json"))
    (bare / "reuse_keys" / "site_labels.parquet").unlink()
    run_report_stage(versions["catalog"], bare, versions["v0"], provenance=versions["prov1"])
    assert _metrics(bare)["fingerprints"] == fp


def _report_after(versions, previous, name):
    """v1's report rebuilt against ``previous``: (its folder, its ``changes`` section)."""
    vdir = versions["v1"].parent / name
    shutil.copytree(versions["v1"], vdir, ignore=shutil.ignore_patterns("report", "metrics.json"))
    run_report_stage(
        versions["catalog"], vdir, previous, provenance=versions["prov1"], reuse=Reuse(str(previous))
    )
    return vdir, _metrics(vdir)["changes"]


def test_previous_fingerprints_of_an_older_kind_use_its_recorded_site_keys(versions):
    _, ch = _report_after(versions, _old_kind_copy(versions, "v0_old_kind", keep_record=True), "v1_after_old")
    assert ch["sites_changed"] == [versions["edited"]] and ch["n_sites_newly_labelled"] == 0
    assert "site_labels_note" not in ch


def test_previous_fingerprints_of_an_older_kind_without_a_record_are_not_compared(versions):
    old = _old_kind_copy(versions, "v0_old_bare", keep_record=False)
    vdir, ch = _report_after(versions, old, "v1_after_old_bare")
    assert ch["n_sites_changed"] is None and ch["sites_changed"] == []  # not "every site changed"
    assert "could not be compared" in ch["site_labels_note"]
    page = (vdir / "report" / "changes.html").read_text(encoding="utf-8")
    assert "could not be compared" in page and "labels changed" not in page
    assert ch["labellers_gone"] == [] and ch["previous_version_id"] == versions["v0"].name


def test_risk_map_key_is_the_colours_it_paints(versions, tmp_path):
    """A site's risk moving within one of the colormap's 256 colours keeps the map's key and its bytes; a
    move across colours changes both (the key is what is drawn, so a reused map equals a redrawn one)."""
    sites = read_table(versions["v0"] / "sites.parquet")
    base = _risks(_metrics(versions["v0"]))
    vmax = max(0.25, max(base.values()))
    site = min(base, key=lambda s: (base[s], s))  # the lowest risk: moving it keeps the scale
    step = vmax / 256  # one colour
    lo = np.floor(base[site] / step) * step  # the edges of the site's colour
    cases = {"within": lo + 0.25 * step, "within2": lo + 0.75 * step, "across": lo + 2.5 * step}

    def draw(risk: dict, name: str) -> bytes:
        (tmp_path / name).mkdir()
        plots.risk_map(sites, risk, tmp_path / name)
        return (tmp_path / name / "map_risk.png").read_bytes()

    keys, images = {}, {}
    for name, value in cases.items():
        risk = {**base, site: float(value)}
        keys[name] = content_key(plots.risk_map_colours(sites, risk))
        images[name] = draw(risk, name)
    assert keys["within"] == keys["within2"] and images["within"] == images["within2"]
    assert keys["within"] != keys["across"] and images["within"] != images["across"]
