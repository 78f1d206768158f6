"""Stage API end to end: tables, rasters, polygons, batching, quality vs crowdkit and labellers."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pandas as pd
import pytest
import shapely
from scipy.stats import spearmanr

from tasks.consensus.labellers import labeller_quality
from tasks.consensus.params import ConsensusParams
from tasks.consensus.rasterise import labeller_mask, rasterise_classes
from tasks.consensus.stage import (
    ASSIGNMENT_QUALITY_COLUMNS,
    CONSENSUS_LABEL_COLUMNS,
    batches,
    consensus_batch,
    fit_pooled_em,
    pattern_counts_batch,
    quality_batch,
    run_consensus_local,
    site_inputs,
)
from tasks.consensus.synthetic import LabellerSpec, demo_tables, synthetic_region
from tasks.consensus.vectorise import vectorise
from tasks.store.grid import SiteGrid, transformer

P = ConsensusParams()
SPECS = {
    "a": LabellerSpec(0.05, 0.1, 1.5, 0.05),
    "b": LabellerSpec(0.1, 0.2, 2.5, 0.1),
    "c": LabellerSpec(0.2, 0.4, 4.0, 0.15),
    "d": LabellerSpec(0.3, 0.7, 6.0, 0.2),
    "f": LabellerSpec(0.15, 0.3, 3.0, 0.1, p_unclassed=0.2),
}


@pytest.fixture(scope="module")
def region():
    return synthetic_region(SPECS, n_sites=48, per_site=4, gold_every=4, size_px=48, seed=0)


@pytest.fixture(scope="module")
def sites(region):
    return list(site_inputs(region.sites, region.labels, region.assignments, ["expert"]))


@pytest.fixture(scope="module")
def result(sites):
    return run_consensus_local(None, None, None, params=P, inputs=sites)


def truth_mask(region, site):
    return rasterise_classes(site.grid, [(g, 1) for g, _ in region.truth[site.site_id]]) > 0


def test_site_inputs(region, sites):
    assert len(sites) == 48
    s0 = sites[0]
    # the EPSG:4326 site polygon reprojects onto the grid box
    assert s0.footprint.equals(shapely.box(*s0.grid.bounds))
    assert [s.is_gold for s in sites] == [k % 4 == 0 for k in range(48)]
    assert s0.reference_id == "expert" and "expert" not in s0.voters and len(s0.voters) == 4
    # reference comes from the catalog list even when the table flag is False
    a = region.assignments.assign(is_reference=False)
    assert next(site_inputs(region.sites, region.labels, a, ["expert"])).reference_id == "expert"
    assert next(site_inputs(region.sites, region.labels, a, [])).reference_id is None


def test_site_footprint_transformer_is_cached_and_exact(region, sites):
    """Footprints reuse one transformer per CRS pair (building one per site cost ~15 ms) and reproject
    exactly as a freshly built one."""
    import pyproj

    src = pyproj.CRS.from_json(region.sites.crs.to_json())  # as read from GeoParquet metadata
    dst = sites[0].grid.crs
    tr = transformer(src, dst)
    assert transformer(src, dst) is tr and transformer(src.to_json(), dst) is tr
    fresh = pyproj.Transformer.from_crs(src, dst, always_xy=True)
    xy = np.asarray(region.sites.geometry.iloc[0].exterior.coords)
    assert np.array_equal(
        np.column_stack(tr.transform(xy[:, 0], xy[:, 1])),
        np.column_stack(fresh.transform(xy[:, 0], xy[:, 1])),
    )
    assert transformer(dst, src) is not tr


def test_assignment_quality_rows(sites, result):
    aq = result.assignment_quality
    assert list(aq.columns) == ASSIGNMENT_QUALITY_COLUMNS
    assert len(aq) == sum(len(s.voters) for s in sites if s.is_gold)
    assert not aq.drop(columns=["completed_at"]).isna().any().any()
    assert aq["lacuna_score"].between(0, 1).all() and aq["tss"].between(-1, 1).all()
    assert quality_batch([s for s in sites if not s.is_gold], P).empty


def test_labeller_quality_table(result):
    lq = result.labeller_quality
    assert sorted(lq["labeller_id"]) == sorted(SPECS)
    assert (lq["n_gold"] > 0).all()
    assert (lq["iou_lo"] <= lq["iou_mean"]).all() and (lq["iou_mean"] <= lq["iou_hi"]).all()
    assert lq["latent_sensitivity"].between(0, 1).all() and lq["latent_iou"].between(0, 1).all()
    # better labellers get better scores
    by = lq.set_index("labeller_id")
    assert by.loc["a", "lacuna_score_mean"] > by.loc["d", "lacuna_score_mean"]
    assert by.loc["a", "latent_iou"] > by.loc["c", "latent_iou"] > by.loc["d", "latent_iou"]


def test_labeller_quality_rolling_trust_drift():
    t0 = pd.Timestamp("2025-01-01", tz="UTC")
    rows = []
    for i in range(8):  # declining labeller: 0.9 - 0.05 per day
        rows.append(
            {"labeller_id": "down", "completed_at": t0 + pd.Timedelta(days=i), "score": 0.9 - 0.05 * i}
        )
    rows += [{"labeller_id": "two", "completed_at": t0, "score": 0.8}]
    rows += [{"labeller_id": "two", "completed_at": t0 + pd.Timedelta(days=1), "score": 0.6}]
    rows += [{"labeller_id": "one", "completed_at": t0, "score": 0.3}]
    aq = pd.DataFrame(rows)
    from tasks.consensus.params import QUALITY_MEASURES

    for m in QUALITY_MEASURES:
        aq[m] = aq["score"]
    for k in ("tp", "fp", "fn", "tn"):
        aq[f"{k}_m2"] = 1.0
    latent = pd.DataFrame(
        {
            "labeller_id": ["down", "nogold"],
            "latent_sensitivity": [0.8, 0.7],
            "latent_specificity": [0.9, 0.95],
        }
    )
    lq = labeller_quality(aq, P, latent).set_index("labeller_id")
    down = lq.loc["down"]
    assert down["drift_slope_per_day"] == pytest.approx(-0.05) and down["drift_p_value"] < 1e-6
    assert down["rolling_score"] == pytest.approx(np.mean([0.9 - 0.05 * i for i in range(3, 8)]))
    assert bool(down["trusted"]) and down["rolling_score"] == pytest.approx(0.65)
    assert (lq.loc["two", "drift_slope_per_day"], lq.loc["two", "drift_p_value"]) == (0.0, 1.0)  # n < 3
    assert (lq.loc["one", "iou_lo"], lq.loc["one", "iou_hi"]) == (0.0, 1.0)  # one task: natural bounds
    assert (lq.loc["one", "tss_lo"], lq.loc["one", "tss_hi"]) == (-1.0, 1.0)
    assert not lq.loc["one", "trusted"]
    ng = lq.loc["nogold"]
    assert ng["n_gold"] == 0 and np.isnan(ng["iou_mean"]) and not ng["trusted"]
    assert ng["latent_specificity"] == 0.95 and np.isnan(lq.loc["one", "latent_sensitivity"])
    again = labeller_quality(aq, P, latent).set_index("labeller_id")
    assert again.loc["down", "iou_lo"] == down["iou_lo"]  # seeded bootstrap


def test_consensus_outputs(sites, result):
    sc = result.site_consensus
    assert len(sc) == 48 and not sc.isna().any().any()
    assert set(sc["method"]) == {"em"}
    for col in ("mean_risk", "risky_fraction", "field_fraction"):
        assert sc[col].between(0, 0.5 if col == "mean_risk" else 1).all()
    for s in sites:
        prob, risk = result.rasters[s.site_id]
        assert prob.shape == (s.grid.height, s.grid.width) and prob.dtype == np.float32
        assert risk.dtype == np.float32 and np.isfinite(prob).all()
        np.testing.assert_allclose(risk, np.minimum(prob, 1 - prob), atol=1e-6)
        if s.is_gold:  # gold output is clamped to the reference
            ref = labeller_mask(s, "expert", P) > 0
            np.testing.assert_array_equal(prob, ref.astype(np.float32))
    cl = result.consensus_labels
    assert list(cl.columns) == CONSENSUS_LABEL_COLUMNS
    assert set(cl["class"].dropna()) <= {"crop", "fallow"}
    assert cl["confidence"].between(0.5, 1).all()
    # polygons reproduce the label map area exactly (pixel-exact vectorisation)
    px = sites[1].grid.pixel_size ** 2
    for sid, g in cl.groupby("site_id"):
        assert g.geometry.area.sum() == pytest.approx((result.label_maps[sid] > 0).sum() * px)


def test_batching_and_pickling_do_not_change_results(sites, result):
    parts = batches(sites, 7)
    counts = [pickle.loads(pickle.dumps(pattern_counts_batch(b, P))) for b in parts]
    model = pickle.loads(pickle.dumps(fit_pooled_em(counts, result.labeller_quality, P)))
    np.testing.assert_allclose(model.sens_zone, result.em_model.sens_zone, atol=1e-12)
    out = pickle.loads(pickle.dumps(consensus_batch(pickle.loads(pickle.dumps(parts[2])), model, None, P)))
    for sid, (prob, _) in out.rasters.items():
        np.testing.assert_allclose(prob, result.rasters[sid][0], atol=1e-7)


def test_bayes_method(sites):
    res = run_consensus_local(None, None, None, params=P.model_copy(update={"method": "bayes"}), inputs=sites)
    assert res.em_model is None and set(res.site_consensus["method"]) == {"bayes"}
    assert not res.site_consensus.isna().any().any()
    assert res.labeller_quality["latent_sensitivity"].isna().all()  # not fitted


def test_vectorise_classes_holes_confidence():
    grid = SiteGrid("v", "EPSG:32633", (2.0, 0.0, 0.0, 0.0, -2.0, 40.0), 20, 20)
    lab = np.zeros((20, 20), np.uint8)
    lab[2:10, 2:10] = 1
    lab[5:7, 5:7] = 0  # hole
    lab[12:18, 12:18] = 2
    lab[0, 19] = 3  # unclassed single pixel
    prob = np.where(lab > 0, 0.8, 0.1).astype(np.float32)
    prob[12:18, 12:18] = 0.6
    rows = sorted(vectorise(lab, prob, grid, P), key=lambda r: -r["n_pixels"])
    assert [r["class"] for r in rows] == ["crop", "fallow", None]
    assert rows[0]["geometry"].area == pytest.approx(60 * 4) and len(rows[0]["geometry"].interiors) == 1
    assert rows[1]["confidence"] == pytest.approx(0.6) and rows[0]["confidence"] == pytest.approx(0.8)


def _compare(sites, res, truth_of):
    """Pooled IoU vs truth on multi-labeller non-gold sites: consensus, crowdkit EM / MV, each labeller."""
    from crowdkit.aggregation import SegmentationEM

    acc: dict[str, list[int]] = {}

    def add(key, pred, t):
        a = acc.setdefault(key, [0, 0])
        a[0] += int((pred & t).sum())
        a[1] += int((pred | t).sum())

    rows, used = [], []
    for s in sites:
        if s.is_gold or len(s.voters) < 2:
            continue
        t, c = truth_of(s), res.label_maps[s.site_id] > 0
        used.append((s, t))
        add("em", c, t)
        for v in s.voters:
            m = labeller_mask(s, v, P) > 0
            add(f"lab:{v}", m, t)
            add(f"em_on:{v}", c, t)
            rows.append((s.site_id, v, m.astype(np.int64)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ck = SegmentationEM().fit_predict(pd.DataFrame(rows, columns=["task", "worker", "segmentation"]))
    for s, t in used:
        add("crowdkit_em", np.asarray(ck[s.site_id]).astype(bool), t)
    return {k: i / u for k, (i, u) in acc.items()}


def true_mean_iou(sites, truth_of) -> pd.Series:
    per_lab: dict[str, list[float]] = {}
    for s in sites:
        t = truth_of(s)
        for v in s.voters:
            m = labeller_mask(s, v, P) > 0
            per_lab.setdefault(v, []).append((m & t).sum() / (m | t).sum() if (m | t).any() else 1.0)
    return pd.Series({k: np.mean(v) for k, v in per_lab.items()})


def test_quality_synthetic_beats_labellers_and_crowdkit(region, sites, result):
    iou = _compare(sites, result, lambda s: truth_mask(region, s))
    assert iou["em"] >= iou["crowdkit_em"]
    for v in SPECS:  # on the same sites, consensus is at least as good as every single labeller
        assert iou[f"em_on:{v}"] >= iou[f"lab:{v}"], v
    true = true_mean_iou(sites, lambda s: truth_mask(region, s))
    lq = result.labeller_quality.set_index("labeller_id").loc[true.index]
    assert spearmanr(lq["latent_iou"], true).statistic >= 0.9


def test_quality_demo_region(tmp_path_factory):
    """The realistic demo campaign (tasks/demo): consensus >= every labeller and crowdkit; ranking."""
    gen = pytest.importorskip("tasks.demo.generate")
    root = tmp_path_factory.mktemp("demo")
    gen.generate_demo_region(root, scale=1, seed=0, sites_per_side=6)
    sites_df, labels, assignments, truth = demo_tables(root, 6)
    sites = list(site_inputs(sites_df, labels, assignments, ["expert"]))
    res = run_consensus_local(None, None, None, params=P, inputs=sites)
    fields = {k: list(g.geometry) for k, g in truth.groupby("site_id")}

    def truth_of(s):
        return rasterise_classes(s.grid, [(g, 1) for g in fields.get(s.site_id, [])]) > 0

    iou = _compare(sites, res, truth_of)
    assert iou["em"] >= iou["crowdkit_em"]
    for key in [k for k in iou if k.startswith("lab:")]:
        assert iou["em_on:" + key[4:]] >= iou[key], key
    true = true_mean_iou(sites, truth_of)
    lq = res.labeller_quality.set_index("labeller_id")
    assert spearmanr(lq.loc[true.index, "latent_iou"], true).statistic >= 0.9
