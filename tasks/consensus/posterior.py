"""Per-site consensus: votes -> posterior, risk, label map, agreement, polygons, summary row.

Raster layout: ``prob`` and ``risk`` are float32 (height, width) on the SiteGrid, NaN outside the site
footprint ("not part of the site"); ``label_map`` is uint8 with 0 = background (and outside), 1..C =
``params.class_names``, C+1 = unclassed field. Summary statistics use footprint pixels only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from tasks.consensus.agreement import site_agreement
from tasks.consensus.em import EMModel
from tasks.consensus.merge import BayesWeights, bayes_classes, bayes_merge, merge_weights
from tasks.consensus.params import ConsensusParams
from tasks.consensus.patterns import SitePatterns, edge_zone, site_patterns
from tasks.consensus.rasterise import labeller_mask, site_footprint_mask
from tasks.consensus.site import SiteInput
from tasks.consensus.vectorise import vectorise

SITE_CONSENSUS_COLUMNS = [
    "site_id",
    "n_labellers",
    "method",
    "is_gold",
    "mean_risk",
    "risky_fraction",
    "field_fraction",
    "mean_pairwise_iou",
    "fleiss_kappa",
    "krippendorff_alpha",
]


@dataclass
class SiteVotes:
    """Votes of one site restricted to its footprint pixels."""

    voters: tuple[str, ...]
    codes: np.ndarray  # (n_voters, n_pixels) uint8 class codes
    gold: np.ndarray | None  # (n_pixels,) reference class codes, None off gold sites
    zone: np.ndarray  # (n_pixels,) EM pixel zone (patterns.edge_zone)
    fp_mask: np.ndarray  # (height, width) bool


def site_votes(site: SiteInput, params: ConsensusParams) -> SiteVotes | None:
    """None when the site has no voter or no footprint pixel (nothing to reach consensus on)."""
    key = ("votes", params.class_names, params.edge_zone_px)
    if key not in site._cache:
        site._cache[key] = _site_votes(site, params)
    return site._cache[key]


def _site_votes(site: SiteInput, params: ConsensusParams) -> SiteVotes | None:
    voters = site.voters
    fp = site_footprint_mask(site)
    if not voters or not fp.any():
        return None
    masks = np.stack([labeller_mask(site, v, params) for v in voters])
    zone = edge_zone(masks > 0, params.edge_zone_px)[fp].astype(np.int8)
    gold = labeller_mask(site, site.reference_id, params)[fp] if site.is_gold else None
    return SiteVotes(voters, masks[:, fp], gold, zone, fp)


def votes_patterns(site: SiteInput, sv: SiteVotes, params: ConsensusParams) -> SitePatterns:
    """The site's unique patterns (with gold on gold sites), cached on the SiteInput for one batch call."""
    key = ("patterns", params.class_names, params.edge_zone_px)
    if key not in site._cache:
        site._cache[key] = site_patterns(sv.codes, sv.gold, params.n_classes + 2, sv.zone)
    return site._cache[key]


def _em_posterior(
    site: SiteInput, sv: SiteVotes, model: EMModel, params: ConsensusParams
) -> tuple[np.ndarray, np.ndarray]:
    """(field posterior, class code) per footprint pixel via a pattern lookup."""
    clamp = params.clamp_gold_output and sv.gold is not None
    pats = votes_patterns(site, sv, params)  # rows differing only by gold get the same posterior
    p = model.field_posterior(sv.voters, pats.votes, pats.zone)
    cls = _classes_from_votes(pats.votes, params)
    cpost = model.class_posterior(sv.voters, pats.votes)
    if cpost is not None:
        has = (pats.votes >= 1) & (pats.votes <= params.n_classes)
        cls = np.where(has.any(axis=1), cpost.argmax(axis=1) + 1, params.unclassed_code).astype(np.uint8)
    if clamp:
        g = pats.gold >= 0
        p = np.where(g, (pats.gold > 0).astype(float), p)
        cls = np.where(g & (pats.gold > 0), pats.gold, cls).astype(np.uint8)
    return p[pats.inverse], cls[pats.inverse]


def _classes_from_votes(votes: np.ndarray, params: ConsensusParams) -> np.ndarray:
    """Plurality class among classed votes (ties -> lower code); unclassed when nobody gave a class."""
    best = np.full(votes.shape[0], params.unclassed_code, dtype=np.uint8)
    best_n = np.zeros(votes.shape[0], dtype=np.int64)
    for c in range(1, params.n_classes + 1):
        n = (votes == c).sum(axis=1)
        better = n > best_n
        best[better], best_n[better] = c, n[better]
    return best


def _bayes_posterior(
    sv: SiteVotes, lq: pd.DataFrame | BayesWeights | None, params: ConsensusParams
) -> tuple[np.ndarray, np.ndarray]:
    q, fs, nfs = merge_weights(sv.voters, lq, params)
    return bayes_merge(sv.codes > 0, q, fs, nfs), bayes_classes(sv.codes, q, fs, params)


@dataclass
class SiteConsensus:
    summary: dict
    polygons: list[dict]
    prob: np.ndarray
    risk: np.ndarray
    label_map: np.ndarray


def consensus_site(
    site: SiteInput, model: EMModel | None, lq: pd.DataFrame | BayesWeights | None, params: ConsensusParams
) -> SiteConsensus | None:
    sv = site_votes(site, params)
    if sv is None:
        return None
    if params.method == "em":
        if model is None:
            raise ValueError("method 'em' needs a fitted EMModel (fit_pooled_em)")
        p, cls = _em_posterior(site, sv, model, params)
    else:
        p, cls = _bayes_posterior(sv, lq, params)
    r = np.minimum(p, 1.0 - p)
    lab = np.where(p >= params.label_threshold, cls, 0).astype(np.uint8)
    shape = sv.fp_mask.shape
    prob = np.full(shape, np.nan, np.float32)
    risk = np.full(shape, np.nan, np.float32)
    label_map = np.zeros(shape, np.uint8)
    prob[sv.fp_mask], risk[sv.fp_mask], label_map[sv.fp_mask] = p, r, lab
    summary = {
        "site_id": site.site_id,
        "n_labellers": len(sv.voters),
        "method": params.method,
        "is_gold": site.is_gold,
        "mean_risk": float(r.mean()),
        "risky_fraction": float((r > params.risk_threshold).mean()),
        "field_fraction": float((lab > 0).mean()),
        **site_agreement(sv.codes > 0),
    }
    polys = vectorise(label_map, prob, site.grid, params)
    for i, row in enumerate(polys):
        row.update({"polygon_id": f"{site.site_id}-c{i:04d}", "site_id": site.site_id, "crs": site.grid.crs})
    return SiteConsensus(summary, polys, prob, risk, label_map)
