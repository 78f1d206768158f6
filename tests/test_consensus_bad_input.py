"""Consensus on awkward campaigns: every case gets a defined result, and no NaN leaks without a meaning."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from schemas.catalog import load_catalog
from tasks.consensus.params import ConsensusParams
from tasks.consensus.stage import run_consensus_local
from tasks.ingest.stage import run_ingest
from tasks.store.artifacts import read_table

NUMERIC = [
    "mean_risk",
    "risky_fraction",
    "field_fraction",
    "mean_pairwise_iou",
    "fleiss_kappa",
    "krippendorff_alpha",
]


@pytest.fixture(scope="module")
def tables(demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ingested")
    run_ingest(load_catalog(demo_root / "data_catalog.yaml"), out)
    return (
        read_table(out / "sites.parquet"),
        read_table(out / "labels"),
        read_table(out / "assignments.parquet"),
    )


def _run(sites, labels, assignments, refs=("expert",)):
    return run_consensus_local(sites, labels, assignments, list(refs), ConsensusParams(n_bootstrap=200))


def _no_nan(res):
    sc = res.site_consensus
    assert len(sc) > 0
    assert not sc[NUMERIC].isna().any().any(), sc[NUMERIC]
    assert ((sc["mean_risk"] >= 0) & (sc["mean_risk"] <= 0.5)).all()


def test_labeller_with_only_empty_assignments(tables):
    sites, labels, a = tables
    lazy = labels["labeller_id"] == "precise"
    a = a.copy()
    a.loc[a["labeller_id"] == "precise", "n_polygons"] = 0
    res = _run(sites, labels[~lazy], a)
    _no_nan(res)
    row = res.labeller_quality.set_index("labeller_id").loc["precise"]
    # Drawing nothing is scored, not skipped: field skill 0 where the reference has fields (1 where it has
    # none, by definition), and a defined score.
    assert row["n_gold"] > 0 and row["field_skill_mean"] <= 0.5 and np.isfinite(row["lacuna_score_mean"])


def test_site_with_one_labeller_and_sites_of_only_spammers(tables):
    sites, labels, a = tables
    done = a[(a.status == "completed") & ~a.is_reference]
    multi = done.groupby("site_id").size()
    target = multi[multi >= 2].index[0]
    # Keep only the spammer on one site, and one labeller on another.
    keep_one = multi[multi >= 2].index[1]
    first = done[done.site_id == keep_one].labeller_id.iloc[0]
    drop = ((a.site_id == target) & (a.labeller_id != "spammer") & ~a.is_reference) | (
        (a.site_id == keep_one) & (a.labeller_id != first) & ~a.is_reference
    )
    if not ((a.site_id == target) & (a.labeller_id == "spammer")).any():
        pytest.skip("no spammer on the chosen site in this region")
    kept = a[~drop]
    key = pd.MultiIndex.from_frame(kept[["site_id", "labeller_id"]])
    lab = labels[pd.MultiIndex.from_frame(labels[["site_id", "labeller_id"]]).isin(key)]
    res = _run(sites, lab, kept)
    _no_nan(res)
    sc = res.site_consensus.set_index("site_id")
    assert sc.loc[keep_one, "n_labellers"] == 1 and sc.loc[keep_one, "mean_pairwise_iou"] == 1.0
    assert sc.loc[target, "n_labellers"] == 1


def test_no_reference_labellers_at_all(tables):
    """Without gold evidence quality comes from the EM alone; gold columns are NaN (= no gold evidence)."""
    sites, labels, a = tables
    a = a[~a.is_reference].assign(is_reference=False)
    labels = labels[labels.labeller_id != "expert"]
    res = _run(sites, labels, a, refs=())
    _no_nan(res)
    lq = res.labeller_quality
    assert (lq["n_gold"] == 0).all() and lq["iou_mean"].isna().all()
    assert lq["latent_sensitivity"].between(0, 1).all()
