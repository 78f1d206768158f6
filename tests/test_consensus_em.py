"""Pooled pattern-count EM: skill recovery, gold clamping, inversion guard, equivalence to per-pixel EM."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit

from tasks.consensus.em import apply_inversion_guard, fit_em, initial_skills
from tasks.consensus.params import ConsensusParams
from tasks.consensus.patterns import (
    edge_zone,
    patterns_frame,
    site_patterns,
    strings_to_votes,
    sum_counts,
    votes_to_strings,
)
from tasks.consensus.synthetic import synthetic_masks

P = ConsensusParams()
P0 = ConsensusParams(edge_zone_px=0)  # plain Dawid-Skene: the model the i.i.d. masks are drawn from


def zone_of(votes, params):
    side = int(round(np.sqrt(votes.shape[1])))
    return edge_zone(votes.reshape(len(votes), side, side) > 0, params.edge_zone_px).reshape(-1)


def counts_of(sites, gold_sites=(), params=P0):
    frames = []
    for k, (voters, votes, truth) in enumerate(sites):
        gold = truth.astype(np.int64) if k in gold_sites else None
        pats = site_patterns(votes, gold, params.n_classes + 2, zone_of(votes, params))
        frames.append(patterns_frame(voters, pats))
    return sum_counts(frames)


def consensus_iou(model, sites, skip=(), params=P0):
    inter = union = 0
    for k, (voters, votes, truth) in enumerate(sites):
        if k in skip:
            continue
        pats = site_patterns(votes, None, params.n_classes + 2, zone_of(votes, params))
        lab = model.field_posterior(voters, pats.votes, pats.zone)[pats.inverse] >= 0.5
        t = truth > 0
        inter += (lab & t).sum()
        union += (lab | t).sum()
    return inter / union


def test_pattern_roundtrip_and_counts():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 4, size=(3, 1000)).astype(np.uint8)
    gold = rng.integers(-1, 4, size=1000)
    pats = site_patterns(codes, gold, 4)
    assert pats.count.sum() == 1000
    np.testing.assert_array_equal(pats.votes[pats.inverse].T, codes)
    np.testing.assert_array_equal(pats.gold[pats.inverse], gold)
    s = votes_to_strings(pats.votes)
    np.testing.assert_array_equal(strings_to_votes(s, 3), pats.votes)
    wide = rng.integers(0, 4, size=(40, 200)).astype(np.uint8)  # key overflow -> row-unique path
    pw = site_patterns(wide, None, 4)
    np.testing.assert_array_equal(pw.votes[pw.inverse].T, wide)


def test_em_recovers_known_skills_without_gold():
    sens = np.array([0.95, 0.85, 0.7, 0.9, 0.6])
    spec = np.array([0.9, 0.95, 0.85, 0.7, 0.8])
    sites = synthetic_masks(sens, spec, n_sites=30, size=64, seed=1)
    m = fit_em(counts_of(sites), None, P0)
    assert m.converged
    np.testing.assert_allclose(m.sens, sens, atol=0.02)
    np.testing.assert_allclose(m.spec, spec, atol=0.02)
    assert m.prior_field == pytest.approx(np.mean([t.mean() for *_, t in sites]), abs=0.02)


def test_gold_pixels_are_clamped():
    """All pixels gold: posteriors are the truth, so the fit is the smoothed empirical gold confusion."""
    sens, spec = np.array([0.8, 0.7, 0.75]), np.array([0.85, 0.8, 0.9])
    sites = synthetic_masks(sens, spec, n_sites=12, size=32, seed=2)
    m = fit_em(counts_of(sites, set(range(12))), None, P0)
    assert m.n_gold_pixels.sum() == sum(v.size for _, v, _ in sites)
    for j in range(3):
        tp = sum(((v[j] > 0) & (t > 0)).sum() for _, v, t in sites)
        pos = sum((t > 0).sum() for *_, t in sites)
        tn = sum(((v[j] == 0) & (t == 0)).sum() for _, v, t in sites)
        neg = sum((t == 0).sum() for *_, t in sites)
        assert m.sens[j] == pytest.approx((tp + 1) / (pos + 2), abs=1e-12)
        assert m.spec[j] == pytest.approx((tn + 1) / (neg + 2), abs=1e-12)
    assert m.prior_field == pytest.approx(pos / (pos + neg), abs=1e-12)
    # partial gold still gives sensible soft posteriors off gold
    m2 = fit_em(counts_of(sites, {0, 1, 2}), None, P0)
    p = m2.field_posterior(sites[5][0], np.array([[0, 0, 0], [1, 1, 1]], np.uint8))
    assert p[0] < 0.05 < 0.95 < p[1]


def test_inversion_guard_unit():
    s, p = apply_inversion_guard(
        np.array([0.2, 0.9, 0.3]), np.array([0.3, 0.9, 0.2]), [False, False, True], 0.02
    )
    assert s[0] + p[0] == pytest.approx(1.02) and s[0] - p[0] == pytest.approx(-0.1)
    assert (s[1], p[1]) == (0.9, 0.9) and (s[2], p[2]) == (0.3, 0.2)


def test_adversarial_majority_with_gold_evidence():
    """3 inverted labellers outvote 2 good ones; gold shows the inversion, so EM reads them flipped."""
    sens = np.array([0.9, 0.88, 0.15, 0.2, 0.1])
    spec = np.array([0.9, 0.92, 0.2, 0.1, 0.15])
    sites = synthetic_masks(sens, spec, n_sites=24, size=32, seed=3)
    gold = set(range(6))
    m = fit_em(counts_of(sites, gold), None, P0)
    assert m.inversion_allowed.tolist() == [False, False, True, True, True]
    np.testing.assert_allclose(m.sens, sens, atol=0.04)
    np.testing.assert_allclose(m.spec, spec, atol=0.04)
    assert consensus_iou(m, sites, skip=gold) > 0.95
    mv = [((v.sum(0) * 2 > len(v)) == (t > 0)).mean() for _, v, t in sites]
    assert np.mean(mv) < 0.5  # majority vote is wrong most of the time


def test_guard_without_gold_keeps_good_majority():
    """No gold: an adversarial minority may not be read as inverted; it is pushed to uninformative."""
    sens = np.array([0.9, 0.85, 0.88, 0.1])
    spec = np.array([0.9, 0.9, 0.85, 0.1])
    sites = synthetic_masks(sens, spec, n_sites=20, size=32, seed=4)
    m = fit_em(counts_of(sites), None, P0)
    assert not m.inversion_allowed.any()
    assert m.sens_zone[3, 0] + m.spec_zone[3, 0] == pytest.approx(1 + P.guard_margin, abs=1e-9)
    best_single = max(
        np.mean([((v[j] > 0) & (t > 0)).sum() / ((v[j] > 0) | (t > 0)).sum() for _, v, t in sites])
        for j in range(3)
    )
    assert consensus_iou(m, sites) > best_single


def naive_em(sites, lq, params):
    """Textbook per-pixel binary Dawid-Skene (per labeller x zone, prior per zone) with the same init,
    smoothing, guard and stopping rule, looping over pixels site by site."""
    ids = sorted({v for voters, _, _ in sites for v in voters})
    idx = {v: i for i, v in enumerate(ids)}
    zones = [zone_of(votes, params).astype(int) for _, votes, _ in sites]
    Z = 2 if params.edge_zone_px > 0 else 1
    s0, p0 = initial_skills(ids, lq, params)
    allowed = np.zeros(len(ids) * Z, bool)
    sens, spec = apply_inversion_guard(np.repeat(s0, Z), np.repeat(p0, Z), allowed, params.guard_margin)
    s, prior = params.smoothing, np.full(Z, 0.5)
    for _ in range(params.em_max_iter):
        posts = []
        for (voters, votes, _), z in zip(sites, zones, strict=True):
            vl = np.array([idx[v] for v in voters])[:, None] * Z + z[None, :]
            f = votes > 0
            llr = np.where(f, np.log(sens[vl]) - np.log1p(-spec[vl]), np.log1p(-sens[vl]) - np.log(spec[vl]))
            posts.append(expit(np.log(prior[z]) - np.log1p(-prior[z]) + llr.sum(0)))
        tp, fn, fp, tn = (np.zeros(len(ids) * Z) for _ in range(4))
        num, den = np.zeros(Z), np.zeros(Z)
        for (voters, votes, _), z, post in zip(sites, zones, posts, strict=True):
            np.add.at(num, z, post)
            np.add.at(den, z, 1.0)
            for r, v in enumerate(voters):
                f, vl = votes[r] > 0, idx[v] * Z + z
                np.add.at(tp, vl[f], post[f])
                np.add.at(fn, vl[~f], post[~f])
                np.add.at(fp, vl[f], 1 - post[f])
                np.add.at(tn, vl[~f], 1 - post[~f])
        ns, npp = apply_inversion_guard(
            (tp + s) / (tp + fn + 2 * s), (tn + s) / (tn + fp + 2 * s), allowed, params.guard_margin
        )
        nprior = (num + s) / (den + 2 * s)
        delta = max(np.abs(ns - sens).max(), np.abs(npp - spec).max(), np.abs(nprior - prior).max())
        sens, spec, prior = ns, npp, nprior
        if delta < params.em_tol:
            break
    return ids, sens.reshape(-1, Z), spec.reshape(-1, Z), prior


@pytest.mark.parametrize("params", [P0, P], ids=["plain", "zones"])
def test_pattern_count_em_equals_naive_pixel_em(params):
    sens = np.array([0.9, 0.75, 0.8, 0.65])
    spec = np.array([0.85, 0.9, 0.7, 0.8])
    sites = synthetic_masks(sens, spec, n_sites=8, size=24, per_site=3, seed=5)
    lq = pd.DataFrame(
        {"labeller_id": ["L00"], "n_gold": [2], "field_skill_pooled": [0.7], "nofield_skill_pooled": [0.8]}
    )
    m = fit_em(counts_of(sites, params=params), lq, params)
    ids, s2, p2, prior2 = naive_em(sites, lq, params)
    assert list(m.labeller_ids) == ids
    np.testing.assert_allclose(m.sens_zone, s2, rtol=0, atol=1e-9)
    np.testing.assert_allclose(m.spec_zone, p2, rtol=0, atol=1e-9)
    np.testing.assert_allclose(m.prior_zone, prior2, rtol=0, atol=1e-9)


def test_class_model_learns_confusions():
    """Two classes: labeller A reliable, B swaps classes half the time; gold classes clamp."""
    rng = np.random.default_rng(6)
    sites = []
    for _ in range(10):
        truth = rng.choice([0, 1, 2], size=900, p=[0.5, 0.25, 0.25]).astype(np.uint8)
        a = truth.copy()
        b = np.where((truth > 0) & (rng.random(900) < 0.5), 3 - truth, truth).astype(np.uint8)
        sites.append((("A", "B"), np.stack([a, b]), truth))
    frames = [
        patterns_frame(v, site_patterns(c, t.astype(np.int64) if k < 3 else None, 4))
        for k, (v, c, t) in enumerate(sites)
    ]
    m = fit_em(sum_counts(frames), None, P)
    assert m.class_conf is not None
    a, b = m.class_conf[0], m.class_conf[1]
    assert a[0, 1] > 0.95 and a[1, 2] > 0.95  # A reports the true class
    assert 0.4 < b[0, 1] < 0.6 and 0.4 < b[1, 2] < 0.6
    post = m.class_posterior(("A", "B"), np.array([[1, 2], [2, 1]], np.uint8))
    assert post[0, 0] > 0.9 and post[1, 1] > 0.9  # trust A on disagreement
