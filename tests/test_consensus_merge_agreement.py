"""Lacuna Bayesian merge in closed form; agreement measures against textbook values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.consensus.agreement import fleiss_kappa, krippendorff_alpha_nominal, site_agreement
from tasks.consensus.merge import bayes_classes, bayes_merge, merge_weights
from tasks.consensus.params import ConsensusParams

P = ConsensusParams()


def test_bayes_merge_two_labellers_closed_form():
    q, fs, nfs = np.array([0.8, 0.6]), np.array([0.9, 0.7]), np.array([0.95, 0.85])
    votes = np.array([[1, 1, 0, 0], [1, 0, 1, 0]], bool)
    h = bayes_merge(votes, q, fs, nfs)
    expect = [1.0, 0.72 / (0.72 + 0.6 * 0.85), 0.42 / (0.42 + 0.8 * 0.95), 0.0]
    np.testing.assert_allclose(h, expect, rtol=1e-12)


def test_bayes_merge_three_labellers_closed_form():
    q, fs, nfs = np.array([0.9, 0.5, 0.7]), np.array([0.8, 0.6, 0.9]), np.array([0.9, 0.7, 0.6])
    votes = np.array([[1], [1], [0]], bool)
    num = 0.9 * 0.8 + 0.5 * 0.6
    assert bayes_merge(votes, q, fs, nfs)[0] == pytest.approx(num / (num + 0.7 * 0.6))
    # all weights zero -> 0.5 (no informative voter)
    assert bayes_merge(votes, np.zeros(3), fs, nfs)[0] == 0.5


def test_merge_weights_use_gold_and_population_defaults():
    lq = pd.DataFrame(
        {
            "labeller_id": ["a", "b", "c"],
            "n_gold": [3, 5, 0],
            "lacuna_score_mean": [0.8, 0.6, np.nan],
            "field_skill_pooled": [0.9, 0.7, np.nan],
            "nofield_skill_pooled": [0.95, 0.85, np.nan],
        }
    )
    q, fs, nfs = merge_weights(["a", "c", "zz"], lq, P)
    np.testing.assert_allclose(q, [0.8, 0.7, 0.7])
    np.testing.assert_allclose(fs, [0.9, 0.8, 0.8])
    np.testing.assert_allclose(nfs, [0.95, 0.9, 0.9])
    q, fs, nfs = merge_weights(["x"], None, P)
    assert (q[0], fs[0], nfs[0]) == (P.fallback_quality, P.fallback_field_skill, P.fallback_nofield_skill)


def test_bayes_classes_weighted_vote():
    codes = np.array([[1, 2, 3, 0], [2, 2, 3, 0], [2, 1, 0, 0]], np.uint8)
    q, fs = np.array([0.9, 0.3, 0.3]), np.ones(3)
    out = bayes_classes(codes, q, fs, P)
    assert out.tolist() == [1, 2, P.unclassed_code, P.unclassed_code]


def test_krippendorff_textbook_example():
    """Krippendorff (2011), 'Computing Krippendorff's alpha-reliability', nominal example: 0.743."""
    n = np.nan
    data = np.array(
        [
            [1, 2, 3, 3, 2, 1, 4, 1, 2, n, n, n],
            [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, n, 3],
            [n, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, n],
            [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, n],
        ]
    )
    assert krippendorff_alpha_nominal(data) == pytest.approx(0.743, abs=5e-4)


def test_fleiss_textbook_example():
    """Fleiss (1971) worked example as in common references: 10 subjects, 14 raters, kappa 0.210."""
    counts = np.array(
        [
            [0, 0, 0, 0, 14],
            [0, 2, 6, 4, 2],
            [0, 0, 3, 5, 6],
            [0, 3, 9, 2, 0],
            [2, 2, 8, 1, 1],
            [7, 7, 0, 0, 0],
            [3, 2, 6, 3, 0],
            [2, 5, 3, 2, 2],
            [6, 5, 2, 1, 0],
            [0, 2, 2, 3, 7],
        ]
    )
    assert fleiss_kappa(counts) == pytest.approx(0.210, abs=5e-4)


def test_site_agreement_perfect_and_degenerate():
    rng = np.random.default_rng(0)
    m = rng.random(500) < 0.3
    perfect = site_agreement(np.stack([m, m, m]))
    assert perfect == {"mean_pairwise_iou": 1.0, "fleiss_kappa": 1.0, "krippendorff_alpha": 1.0}
    assert site_agreement(m[None, :]) == perfect  # one labeller: documented 1.0
    assert site_agreement(np.zeros((3, 100), bool)) == perfect  # all background


def test_site_agreement_matches_generic_alpha_and_pairwise_iou():
    rng = np.random.default_rng(1)
    f = rng.random((4, 300)) < np.array([[0.3], [0.4], [0.2], [0.5]])
    got = site_agreement(f)
    assert got["krippendorff_alpha"] == pytest.approx(krippendorff_alpha_nominal(f.astype(float)), rel=1e-9)
    counts = np.stack([(~f).sum(0), f.sum(0)], axis=1)
    assert got["fleiss_kappa"] == pytest.approx(fleiss_kappa(counts), rel=1e-9)
    ious = [(f[i] & f[j]).sum() / (f[i] | f[j]).sum() for i in range(4) for j in range(i + 1, 4)]
    assert got["mean_pairwise_iou"] == pytest.approx(np.mean(ious), rel=1e-6)
