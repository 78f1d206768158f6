"""Inter-labeller agreement of one site (binary field / background, footprint pixels as items).

Degenerate values (documented in docs/consensus.md): a site with a single labeller has no pair to compare,
so all three measures are 1.0 ("no observed disagreement"); filter on ``n_labellers >= 2`` when agreement is
used as evidence. When every vote is the same category (e.g. all background) the chance-corrected measures
are 0/0 and are set to 1.0 for the same reason; a pair of empty masks has IoU 1.0.
"""

from __future__ import annotations

import numpy as np


def fleiss_kappa(counts: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Fleiss' kappa from an (items, categories) matrix of rater counts (same raters per item).

    ``weights`` repeats item rows (pattern counts). Returns 1.0 when expected agreement is 1.
    """
    counts = np.asarray(counts, dtype=float)
    w = np.ones(len(counts)) if weights is None else np.asarray(weights, dtype=float)
    n = counts.sum(axis=1)
    if len(n) == 0 or w.sum() == 0:
        return 1.0
    if not np.allclose(n, n[0]):
        raise ValueError("Fleiss' kappa needs the same number of raters on every item")
    n = n[0]
    if n < 2:
        return 1.0
    p_i = ((counts**2).sum(axis=1) - n) / (n * (n - 1))
    p_bar = float(w @ p_i / w.sum())
    p_c = (w @ counts) / (w.sum() * n)
    p_e = float((p_c**2).sum())
    if p_e >= 1.0 - 1e-12:
        return 1.0
    return (p_bar - p_e) / (1.0 - p_e)


def alpha_from_coincidence(o: np.ndarray) -> float:
    """Krippendorff's alpha (nominal) from a coincidence matrix; 1.0 when all values are one category."""
    o = np.asarray(o, dtype=float)
    n_c = o.sum(axis=1)
    n = n_c.sum()
    if n <= 1:
        return 1.0
    d_o = o.sum() - np.trace(o)
    d_e = (n_c.sum() ** 2 - (n_c**2).sum()) / (n - 1)
    if d_e <= 0:
        return 1.0
    return float(1.0 - d_o / d_e)


def krippendorff_alpha_nominal(data: np.ndarray) -> float:
    """Alpha for an (raters, units) array of category values, NaN = missing (any raters per unit)."""
    data = np.asarray(data, dtype=float)
    cats = np.unique(data[np.isfinite(data)])
    index = {c: i for i, c in enumerate(cats)}
    o = np.zeros((len(cats), len(cats)))
    for u in range(data.shape[1]):
        vals = data[np.isfinite(data[:, u]), u]
        m = len(vals)
        if m < 2:
            continue  # unpairable units carry no agreement information
        cnt = np.zeros(len(cats))
        for v in vals:
            cnt[index[v]] += 1
        o += (np.outer(cnt, cnt) - np.diag(cnt)) / (m - 1)
    return alpha_from_coincidence(o)


def site_agreement(field: np.ndarray) -> dict[str, float]:
    """Mean pairwise IoU, Fleiss' kappa and Krippendorff's alpha of (n_voters, n_pixels) boolean votes."""
    n, npx = field.shape
    if n < 2 or npx == 0:
        return {"mean_pairwise_iou": 1.0, "fleiss_kappa": 1.0, "krippendorff_alpha": 1.0}
    f = field.astype(np.float64)  # exact integer counts, order-independent
    inter = f @ f.T
    size = np.diag(inter)
    union = size[:, None] + size[None, :] - inter
    iu = np.triu_indices(n, 1)
    ious = np.where(union[iu] > 0, inter[iu] / np.maximum(union[iu], 1), 1.0)
    # Votes per pixel are all both measures need: histogram of the number of field votes.
    m = field.sum(axis=0)
    h = np.bincount(m, minlength=n + 1).astype(float)
    ks = np.arange(n + 1, dtype=float)
    counts = np.stack([n - ks, ks], axis=1)
    kappa = fleiss_kappa(counts, h)
    o01 = float(h @ ((n - ks) * ks)) / (n - 1)
    o00 = float(h @ ((n - ks) * (n - ks - 1))) / (n - 1)
    o11 = float(h @ (ks * (ks - 1))) / (n - 1)
    alpha = alpha_from_coincidence(np.array([[o00, o01], [o01, o11]]))
    return {
        "mean_pairwise_iou": float(ious.mean()),
        "fleiss_kappa": float(kappa),
        "krippendorff_alpha": alpha,
    }
