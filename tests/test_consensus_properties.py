"""Properties (hypothesis): labeller order is irrelevant, unanimity means no risk, a perfect extra voter
never hurts."""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.consensus.params import ConsensusParams
from tasks.consensus.rasterise import labeller_mask
from tasks.consensus.stage import consensus_batch, run_consensus_local, site_inputs
from tasks.consensus.synthetic import LabellerSpec, synthetic_region

SPECS = {
    "p": LabellerSpec(0.1, 0.2, 2.0, 0.1),
    "q": LabellerSpec(0.2, 0.5, 4.0, 0.2),
    "r": LabellerSpec(0.3, 0.8, 6.0, 0.3),
    "s": LabellerSpec(0.15, 0.3, 3.0, 0.1, p_unclassed=0.3),
}
FAST = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
METHODS = st.sampled_from(["em", "bayes"])


def small_region(seed, per_site=3):
    return synthetic_region(SPECS, n_sites=6, size_px=24, per_site=per_site, gold_every=2, seed=seed)


@FAST
@given(seed=st.integers(0, 10_000), perm=st.permutations(sorted(SPECS)), method=METHODS)
def test_permuting_labellers_changes_nothing(seed, perm, method):
    reg = small_region(seed)
    params = ConsensusParams(method=method)
    rename = dict(zip(sorted(SPECS), perm, strict=True))
    labels = reg.labels.assign(labeller_id=reg.labels["labeller_id"].replace(rename)).sample(
        frac=1, random_state=seed
    )
    assign = reg.assignments.assign(labeller_id=reg.assignments["labeller_id"].replace(rename))
    assign = assign.sample(frac=1, random_state=seed + 1)
    # renamed labellers keep their own timestamps, so relabelling is a pure permutation of identities
    a = run_consensus_local(reg.sites, reg.labels, reg.assignments, ["expert"], params)
    b = run_consensus_local(reg.sites, labels, assign, ["expert"], params)
    cols = [
        "mean_risk",
        "risky_fraction",
        "field_fraction",
        "mean_pairwise_iou",
        "fleiss_kappa",
        "krippendorff_alpha",
    ]
    pd.testing.assert_frame_equal(a.site_consensus[cols], b.site_consensus[cols], rtol=1e-9, atol=1e-9)
    for sid, (prob, _) in a.rasters.items():
        np.testing.assert_allclose(prob, b.rasters[sid][0], atol=1e-9)
        np.testing.assert_array_equal(a.label_maps[sid], b.label_maps[sid])


@FAST
@given(seed=st.integers(0, 10_000), n=st.integers(1, 4))
def test_unanimous_sites_have_no_risk(seed, n):
    reg = small_region(seed, per_site=1)
    crew = sorted(SPECS)[:n]
    lab, asg = [], []
    for row in reg.labels.itertuples(index=False):  # everyone copies the first labeller of the site
        if row.labeller_id != "expert":
            lab += [row._replace(labeller_id=c, polygon_id=f"{row.polygon_id}-{c}") for c in crew]
    for row in reg.assignments.itertuples(index=False):
        if not row.is_reference:
            asg += [row._replace(labeller_id=c) for c in crew]
    labels = pd.DataFrame(lab, columns=reg.labels.columns)
    assign = pd.DataFrame(asg, columns=reg.assignments.columns)
    bayes = run_consensus_local(reg.sites, labels, assign, [], ConsensusParams(method="bayes"))
    assert (bayes.site_consensus["mean_risk"] == 0).all() and (
        bayes.site_consensus["risky_fraction"] == 0
    ).all()
    assert (bayes.site_consensus["krippendorff_alpha"] == 1).all()
    em = run_consensus_local(reg.sites, labels, assign, [], ConsensusParams())
    if n >= 2:  # a lone labeller's votes keep the uncertainty of its skills; agreeing ones do not
        assert (em.site_consensus["risky_fraction"] == 0).all()
        assert (em.site_consensus["mean_risk"] < 1e-3).all()


@FAST
@given(seed=st.integers(0, 10_000), method=METHODS)
def test_copy_of_reference_never_lowers_iou(seed, method):
    """Adding a voter who draws the reference moves every pixel toward the reference (weights fixed)."""
    reg = small_region(seed)
    params = ConsensusParams(method=method, clamp_gold_output=False)
    base = run_consensus_local(reg.sites, reg.labels, reg.assignments, ["expert"], params)
    ref = reg.labels[reg.labels["labeller_id"] == "expert"].assign(labeller_id="refcopy")
    ref_a = reg.assignments[reg.assignments["labeller_id"] == "expert"].assign(
        labeller_id="refcopy", is_reference=False
    )
    labels = pd.concat([reg.labels, ref], ignore_index=True)
    assign = pd.concat([reg.assignments, ref_a], ignore_index=True)
    sites = [s for s in site_inputs(reg.sites, labels, assign, ["expert"]) if s.is_gold]
    more = consensus_batch(sites, base.em_model, base.labeller_quality, params)
    for s in sites:
        ref_mask = labeller_mask(s, "expert", params) > 0
        for lab_map in (base.label_maps[s.site_id], more.label_maps[s.site_id]):
            assert lab_map.shape == ref_mask.shape

        def iou(m, r=ref_mask):
            return (m & r).sum() / (m | r).sum() if (m | r).any() else 1.0

        assert iou(more.label_maps[s.site_id] > 0) >= iou(base.label_maps[s.site_id] > 0)
