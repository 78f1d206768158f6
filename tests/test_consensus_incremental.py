"""Incremental consensus: unchanged sites are reused, changes propagate, outputs equal a full recompute.

Every scenario builds version folders of a copy of the tiny demo region (3x3 sites per scene): ``v0`` is a
first run; the inputs are then edited, re-ingested into ``v1``, and consensus runs twice on the same ingest
tables: with reuse of ``v0`` and as a full recompute (``Reuse(v0, enabled=False)``). Both must publish
identical outputs (same checksums, tables row for row, rasters pixel for pixel).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
import yaml

from schemas.catalog import load_catalog
from tasks.consensus.incremental import INPUTS_STAGE, STAGE, ConsensusModel, carry_model, fit_key
from tasks.consensus.run import params_from_catalog, read_consensus_model, run_consensus_stage
from tasks.consensus.stage import site_inputs, site_voters
from tasks.ingest.stage import run_ingest
from tasks.store.artifacts import read_table
from tasks.store.reuse import Reuse, read_keys

REPO = Path(__file__).resolve().parents[1]
BATCH = 4
TABLES = ("assignment_quality", "labeller_quality", "site_consensus", "consensus_labels")


def _catalog_file(root: Path, **consensus) -> Path:
    """The repository catalog with ``root: "."``; batches of 4 sites, so the 13 labelled sites of the demo
    region span several batches (and consensus_labels chunks)."""
    raw = yaml.safe_load((REPO / "data_catalog.yaml").read_text(encoding="utf-8"))
    raw["root"] = "."
    raw["settings"].setdefault("ingest", {})["batch_size"] = BATCH
    raw["settings"]["consensus"] = {**raw["settings"].get("consensus", {}), **consensus}
    path = root / "data_catalog.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def _ingest(root: Path, name: str) -> Path:
    vdir = root / "versions" / name
    vdir.mkdir(parents=True)
    run_ingest(load_catalog(root / "data_catalog.yaml"), vdir)
    return vdir


def _base(demo_root: Path, folder: Path, **consensus) -> Path:
    """A copy of the demo inputs with its catalog and a first consensus run in versions/v0."""
    shutil.copytree(demo_root / "inputs", folder / "inputs")
    _catalog_file(folder, **consensus)
    vdir = _ingest(folder, "v0")
    run_consensus_stage(load_catalog(folder / "data_catalog.yaml"), vdir)
    return folder


@pytest.fixture(scope="module")
def em_base(demo_root, tmp_path_factory) -> Path:
    return _base(demo_root, tmp_path_factory.mktemp("incremental_em"))


@pytest.fixture
def region(em_base, tmp_path) -> Path:
    """A private copy of the base region (inputs, catalog, v0) a test may edit."""
    root = tmp_path / "region"
    shutil.copytree(em_base, root)
    return root


def _edit_labels(root: Path, edit) -> None:
    path = root / "inputs" / "labels.parquet"
    edit(gpd.read_parquet(path)).to_parquet(path)


def _reprocess(root: Path, refit: bool, name: str = "v1"):
    """Ingest the (edited) inputs once, then consensus with reuse of v0 and as a full recompute."""
    catalog = load_catalog(root / "data_catalog.yaml")
    vdir = _ingest(root, name)
    full = root / "versions" / f"{name}_full"
    shutil.copytree(vdir, full)
    prev = str(root / "versions" / "v0")
    inc = run_consensus_stage(catalog, vdir, Reuse(prev, enabled=True, refit=refit))
    ref = run_consensus_stage(catalog, full, Reuse(prev, enabled=False, refit=refit))
    return vdir, inc, full, ref


def _recomputed(vdir: Path, stage: str = STAGE) -> set[str]:
    return {u for u, (_, where) in read_keys(vdir, stage).items() if where == vdir.name}


def _frame(vdir: Path, name: str) -> pd.DataFrame:
    df = pd.DataFrame(read_table(vdir / (name if name == "consensus_labels" else f"{name}.parquet")))
    if "geometry" in df:
        df["geometry"] = shapely.to_wkb(np.asarray(df["geometry"], dtype=object))
    return df


def _assert_same_outputs(a: Path, ra, b: Path, rb) -> None:
    """Identical published outputs: every artifact's checksum (keys aside: they record where each unit
    was computed), the tables row for row, the rasters pixel for pixel, the model byte for byte."""
    names = {k for k in ra.artifacts if not k.startswith("reuse_keys/")}
    assert names == {k for k in rb.artifacts if not k.startswith("reuse_keys/")}
    for k in sorted(names):
        assert ra.artifacts[k] == rb.artifacts[k], k
    for name in TABLES:
        pd.testing.assert_frame_equal(_frame(a, name), _frame(b, name), check_exact=True)
    assert (a / "consensus_model.json").read_bytes() == (b / "consensus_model.json").read_bytes()
    parts = sorted(p.name for p in (a / "consensus_labels").iterdir())
    assert parts == sorted(p.name for p in (b / "consensus_labels").iterdir()) and parts
    tifs = sorted(p.name for p in (a / "consensus_rasters").glob("*.tif"))
    assert tifs == sorted(p.name for p in (b / "consensus_rasters").glob("*.tif")) and tifs
    for t in tifs:
        with rasterio.open(a / "consensus_rasters" / t) as x, rasterio.open(b / "consensus_rasters" / t) as y:
            np.testing.assert_array_equal(x.read(), y.read())
    assert read_keys(a, STAGE).keys() == read_keys(b, STAGE).keys()
    assert {u: k for u, (k, _) in read_keys(a, STAGE).items()} == {
        u: k for u, (k, _) in read_keys(b, STAGE).items()
    }


def _site_rows(vdir: Path, site_id: str) -> pd.DataFrame:
    sc = _frame(vdir, "site_consensus")
    return sc[sc["site_id"] == site_id].reset_index(drop=True)


def _mapped_by(vdir: Path, labeller: str) -> set[str]:
    a = read_table(vdir / "assignments.parquet")
    return set(a.loc[(a["labeller_id"] == labeller) & (a["status"] == "completed"), "site_id"])


# ------------------------------------------------------------------------------------------------ (a)
def test_unchanged_rerun_reuses_every_site_and_equals_a_full_recompute(region):
    v0 = region / "versions" / "v0"
    v1, inc, full, ref = _reprocess(region, refit=True)
    units = inc.counts["consensus_units"]
    assert units == 13 and inc.counts["consensus_reused"] == units and inc.counts["consensus_recomputed"] == 0
    assert inc.counts["consensus_quality_reused"] == units
    assert ref.counts["consensus_recomputed"] == units and ref.counts["consensus_quality_reused"] == 0
    assert _recomputed(v1) == set() and _recomputed(v1, INPUTS_STAGE) == set()
    assert all(where == "v0" for _, where in read_keys(v1, STAGE).values())
    _assert_same_outputs(v1, inc, full, ref)
    # same inputs and code: the first version's outputs too, and rasters are shared, not copied
    for name in TABLES:
        pd.testing.assert_frame_equal(_frame(v1, name), _frame(v0, name), check_exact=True)
    for tif in (v1 / "consensus_rasters").glob("*.tif"):
        assert (
            tif.samefile(v0 / "consensus_rasters" / tif.name)
            or tif.read_bytes() == (v0 / "consensus_rasters" / tif.name).read_bytes()
        )
    assert inc.artifacts["reuse_keys/consensus"]["rows"] == units


# ------------------------------------------------------------------------------------------------ (b)
def _shift_one_polygon(site: str, labeller: str, dx: float):
    def edit(g: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
        i = g.index[(g["site_id"] == site) & (g["labeller_id"] == labeller)][0]
        g.loc[i, "geometry"] = shapely.affinity.translate(g.loc[i, "geometry"], dx, 0.0)
        return g

    return edit


def test_one_relabelled_site_is_the_only_one_recomputed(region):
    v0 = region / "versions" / "v0"
    site = "S00007"  # multi-labeller, not gold
    row = _site_rows(v0, site)
    assert not row["is_gold"].item() and row["n_labellers"].item() >= 2
    _edit_labels(region, _shift_one_polygon(site, "drifter", 8.0))
    v1, inc, full, ref = _reprocess(region, refit=False)
    assert _recomputed(v1) == {site} and _recomputed(v1, INPUTS_STAGE) == {site}
    assert inc.counts["consensus_recomputed"] == 1 and inc.counts["consensus_reused"] == 12
    assert inc.counts["consensus_values_refitted"] == 0  # the refit moved every value by < tolerance
    _assert_same_outputs(v1, inc, full, ref)
    # the site's consensus did change; every other site's rows are the previous version's
    assert not _site_rows(v1, site).equals(_site_rows(v0, site))
    sc0, sc1 = _frame(v0, "site_consensus"), _frame(v1, "site_consensus")
    pd.testing.assert_frame_equal(sc0[sc0["site_id"] != site], sc1[sc1["site_id"] != site])
    # consensus_labels: the changed site's chunk is rewritten, every other chunk's part is v0's file
    parts = sorted((v1 / "consensus_labels").glob("*.parquet"))
    assert len(parts) == 4
    shared = {p.name for p in parts if (v0 / "consensus_labels" / p.name).exists()}
    assert len(shared) == 3
    assert all((v1 / "consensus_labels" / n).samefile(v0 / "consensus_labels" / n) for n in shared)
    # the pooled counts are the exact integer sums: identical to the full recompute's per-site rows
    pd.testing.assert_frame_equal(
        pd.read_parquet(v1 / "consensus_pattern_counts.parquet"),
        pd.read_parquet(full / "consensus_pattern_counts.parquet"),
        check_exact=True,
    )


# ------------------------------------------------------------------------------------------------ (c)
def _spam_more_on(site: str, labeller: str):
    """Replace the labeller's polygons on ``site`` by their bounding box: more false field on a gold site
    with an empty reference, so the labeller's gold quality (no-field skill) drops."""

    def edit(g: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
        m = (g["site_id"] == site) & (g["labeller_id"] == labeller)
        box = shapely.union_all(list(g.loc[m, "geometry"])).envelope
        row = gpd.GeoDataFrame(
            {"site_id": [site], "labeller_id": [labeller], "label": ["crop"]}, geometry=[box], crs=g.crs
        )
        return pd.concat([g[~m], row], ignore_index=True)

    return edit


def test_new_gold_evidence_propagates_to_every_site_of_that_labeller(region):
    v0 = region / "versions" / "v0"
    gold, labeller = "S00010", "spammer"
    assert _site_rows(v0, gold)["is_gold"].item()
    _edit_labels(region, _spam_more_on(gold, labeller))
    v1, inc, full, ref = _reprocess(region, refit=False)
    _assert_same_outputs(v1, inc, full, ref)
    mapped = _mapped_by(v1, labeller)
    labelled = set(read_keys(v1, STAGE))
    assert len(mapped) == 6 and len(labelled - mapped) == 7
    # pass 1 reran only the edited site; the labeller's new values changed the key of every site they
    # mapped, and only those (everyone else's values moved by less than the tolerance and were carried)
    assert _recomputed(v1, INPUTS_STAGE) == {gold}
    assert _recomputed(v1) == mapped
    k0, k1 = read_keys(v0, STAGE), read_keys(v1, STAGE)
    assert {s for s in labelled if k0[s][0] != k1[s][0]} == mapped
    assert inc.counts["consensus_values_refitted"] == 1
    # labeller_quality reports the fresh measurement
    lq0 = read_table(v0 / "labeller_quality.parquet").set_index("labeller_id")
    lq1 = read_table(v1 / "labeller_quality.parquet").set_index("labeller_id")
    assert lq1.loc[labeller, "nofield_skill_pooled"] < lq0.loc[labeller, "nofield_skill_pooled"] - 0.01
    # the model used: the labeller's refitted values, everyone else's carried bit for bit
    m0, m1 = read_consensus_model(v0).em, read_consensus_model(v1).em
    for j, lab in enumerate(m1.labeller_ids):
        i = m0.labeller_ids.index(lab)
        same = np.array_equal(m1.sens_zone[j], m0.sens_zone[i]) and np.array_equal(
            m1.class_conf[j], m0.class_conf[i]
        )
        assert same == (lab != labeller), lab
    assert np.array_equal(m1.prior_zone, m0.prior_zone)


def test_nightly_refit_uses_exact_values_and_still_equals_a_full_refresh(region):
    _edit_labels(region, _spam_more_on("S00010", "spammer"))
    v1, inc, full, ref = _reprocess(region, refit=True)
    _assert_same_outputs(v1, inc, full, ref)
    # exact refit: every labeller's values moved a little, so every site is recomputed
    assert inc.counts["consensus_recomputed"] == inc.counts["consensus_units"]
    assert inc.counts["consensus_quality_reused"] == inc.counts["consensus_units"] - 1
    m0, m1 = read_consensus_model(region / "versions" / "v0").em, read_consensus_model(v1).em
    assert not np.array_equal(m0.sens_zone, m1.sens_zone)


# ------------------------------------------------------------------------------------------ bayes merge
def test_bayes_method_reuses_and_carries_merge_weights(demo_root, tmp_path):
    root = _base(demo_root, tmp_path / "bayes", method="bayes")
    _edit_labels(root, _shift_one_polygon("S00007", "drifter", 8.0))
    v1, inc, full, ref = _reprocess(root, refit=False)
    _assert_same_outputs(v1, inc, full, ref)
    assert _recomputed(v1) == {"S00007"}
    assert not (v1 / "consensus_pattern_counts.parquet").exists() or not len(
        pd.read_parquet(v1 / "consensus_pattern_counts.parquet")
    )
    model = read_consensus_model(v1)
    assert model.method == "bayes" and model.em is None and model.bayes.table


# --------------------------------------------------------------------------------------- the model file
def test_model_json_round_trips_exactly_and_carries_within_tolerance(em_base):
    v0 = em_base / "versions" / "v0"
    text = (v0 / "consensus_model.json").read_text(encoding="utf-8")
    model = ConsensusModel.from_json(text)
    assert model.to_json() == text and json.loads(text)["method"] == "em"
    em = model.em
    assert model.fit_key == fit_key(params_from_catalog(load_catalog(em_base / "data_catalog.yaml")))

    def nudged(lab: str, by: float) -> ConsensusModel:
        sens = em.sens_zone.copy()
        sens[em.labeller_ids.index(lab)] += by
        return ConsensusModel("em", model.fit_key, em=dataclasses.replace(em, sens_zone=sens))

    used, changed = carry_model(nudged("precise", 0.005), model, 0.01)
    assert changed == set() and np.array_equal(used.em.sens_zone, em.sens_zone)
    used, changed = carry_model(nudged("precise", 0.02), model, 0.01)
    assert changed == {"labeller:precise"}
    assert np.array_equal(used.em.sens_zone, nudged("precise", 0.02).em.sens_zone)
    # values fitted under other parameters or code are never carried
    other = ConsensusModel("em", "0" * 32, em=nudged("precise", 0.005).em)
    used, changed = carry_model(other, model, 0.01)
    assert "labeller:precise" in changed and not np.array_equal(used.em.sens_zone, em.sens_zone)


def test_site_voters_match_the_site_inputs(em_base):
    """Reused sites get their voters from the assignments alone; they must be SiteInput's."""
    v0 = em_base / "versions" / "v0"
    sites, labels = read_table(v0 / "sites.parquet"), read_table(v0 / "labels")
    a = read_table(v0 / "assignments.parquet")
    # a labeller assigned twice (the latest completion wins: here it makes them the site's reference), and
    # a missing reference flag
    twice = a[a["site_id"] == "S00001"].head(1)
    twice = twice.assign(completed_at=pd.Timestamp("2027-01-01", tz="UTC"), is_reference=True)
    a = pd.concat([a, twice], ignore_index=True)
    a["is_reference"] = a["is_reference"].astype(object)
    a.loc[a["site_id"] == "S00007", "is_reference"] = None
    for refs in (["expert"], ["expert", "drifter"], []):
        expected = {s.site_id: s.voters for s in site_inputs(sites, labels, a, refs)}
        assert site_voters(a, refs) == expected and len(expected) == 13
    assert twice["labeller_id"].item() not in site_voters(a, ["expert"])["S00001"]
