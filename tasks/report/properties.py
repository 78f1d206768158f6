"""Dataset properties: class and spatial balance, intrinsic dimension and label sharpness of tile patches.

Intrinsic dimension (Levina-Bickel MLE with k = 20 as in Konz & Mazurowski 2024, and TwoNN by Facco et al.
2017) and label sharpness K_F = max |y_j - y_k| / ||x_j - x_k|| (Konz & Mazurowski 2024) are estimated on a
seeded sample of image patches; x is the patch averaged down to a few pixels per side, each band scaled to
[0, 1] by the region's 2-98 % range, y the consensus field/no-field label of the patch.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from tasks.report.imagery import read_window
from tasks.report.load import Artifacts
from tasks.report.metrics import num
from tasks.report.params import ReportSettings
from tasks.report.thumbs import read_band
from tasks.store.grid import SiteGrid


def twonn(x: np.ndarray) -> float | None:
    """TwoNN maximum-likelihood estimate d = N / sum log(r2 / r1); duplicates (r1 = 0) are dropped."""
    if len(x) < 3:
        return None
    dist, _ = cKDTree(x).query(x, k=3)
    r1, r2 = dist[:, 1], dist[:, 2]
    ok = r1 > 0
    mu = r2[ok] / r1[ok]
    s = np.log(mu).sum()
    return float(ok.sum() / s) if s > 0 else None


def mle_dimension(x: np.ndarray, k: int = 20) -> float | None:
    """Levina-Bickel MLE with the MacKay-Ghahramani average: (mean_i mean_j<k log(T_k / T_j))^-1."""
    k = min(k, len(x) - 1)
    if k < 3:
        return None
    dist, _ = cKDTree(x).query(x, k=k + 1)
    t = dist[:, 1:]
    ok = t[:, 0] > 0
    if not ok.any():
        return None
    logs = np.log(t[ok, -1:] / t[ok, :-1])
    m = logs.mean()
    return float(1.0 / m) if m > 0 else None


def label_sharpness(x: np.ndarray, y: np.ndarray) -> float | None:
    """K_F for binary labels: 1 / the smallest distance between two patches with different labels."""
    a, b = x[y == 1], x[y == 0]
    if not len(a) or not len(b):
        return None
    d, _ = cKDTree(b).query(a, k=1)
    d = d[d > 0]
    return float(1.0 / d.min()) if len(d) else None


def _band_range(tiles: pd.DataFrame, n: int) -> tuple[np.ndarray, np.ndarray]:
    lo = np.array([np.nanmedian([v[i] for v in tiles["p02"]]) for i in range(n)], dtype=np.float32)
    hi = np.array([np.nanmedian([v[i] for v in tiles["p98"]]) for i in range(n)], dtype=np.float32)
    return lo, np.maximum(hi, lo + 1e-6)


def sample_patches(art: Artifacts, scenes: dict[str, str], s: ReportSettings, visited: list | None = None):
    """Seeded sample of (features, label or -1) from the site tiles; labels from the consensus probability.

    ``visited`` (a list) receives the sites read, in order: the only sites whose rasters the result
    depends on (the report's reuse key names their consensus rasters)."""
    visited = [] if visited is None else visited
    sites, tiles = art.table("sites"), art.attributes("tiles")
    if not len(sites) or not scenes:
        return np.zeros((0, 0), np.float32), np.zeros(0, int)
    n_bands = len(tiles["band_names"].iloc[0])
    lo, hi = _band_range(tiles, n_bands)
    rng = np.random.default_rng(s.seed)
    order = rng.permutation(len(sites))
    per_site = max(4, math.ceil(s.property_patches / len(sites)))
    feats, labels = [], []
    opened: dict = {}  # each scene is opened once
    try:
        _sample(art, scenes, s, sites, lo, hi, rng, order, per_site, feats, labels, visited, opened)
    finally:
        for ds in opened.values():
            ds.close()
    if not feats:
        return np.zeros((0, 0), np.float32), np.zeros(0, int)
    return np.asarray(feats[: s.property_patches], np.float32), np.asarray(labels[: s.property_patches])


def _sample(art, scenes, s, sites, lo, hi, rng, order, per_site, feats, labels, visited, opened) -> None:
    p, f = s.patch_px, s.patch_feature_px
    for i in order:
        row = sites.iloc[int(i)]
        path = scenes.get(str(row["scene_id"]))
        if path is None:
            continue
        grid = SiteGrid.from_row(row)
        visited.append(grid.site_id)
        a = read_window(path, grid, datasets=opened)
        if a is None:
            continue
        prob = read_band(art.raster_path("consensus_rasters", grid.site_id), 1, a.shape[1])
        a = (a - lo[: a.shape[0], None, None]) / (hi - lo)[: a.shape[0], None, None]
        cells = [(r, c) for r in range(0, a.shape[1] - p + 1, p) for c in range(0, a.shape[2] - p + 1, p)]
        for k in rng.permutation(len(cells))[:per_site]:
            r, c = cells[int(k)]
            patch = a[:, r : r + p, c : c + p]
            if not np.isfinite(patch).all():
                continue
            pooled = patch.reshape(patch.shape[0], f, p // f, f, p // f).mean(axis=(2, 4))
            feats.append(np.clip(pooled, 0, 1).ravel())
            pr = None if prob is None else prob[r : r + p, c : c + p]
            labels.append(-1 if pr is None or not np.isfinite(pr).all() else int((pr >= 0.5).mean() >= 0.5))
        if len(feats) >= s.property_patches:
            break


SAMPLED = ("intrinsic_dimension", "label_sharpness", "sample_sites")  # what the patch sample gives


def properties_section(
    art: Artifacts, scenes: dict[str, str], s: ReportSettings, consensus: dict, sampled: dict | None = None
) -> dict:
    """Class and spatial balance, and (unless ``sampled`` gives them: the ``SAMPLED`` entries of a
    version whose sample read the same pixels) intrinsic dimension and label sharpness."""
    out = {"class_balance": class_balance(art, consensus), "spatial_balance": spatial_balance(art)}
    return {**out, **(sampled if sampled is not None else sampled_properties(art, scenes, s))}


def sampled_properties(art: Artifacts, scenes: dict[str, str], s: ReportSettings) -> dict:
    visited: list[str] = []
    x, y = sample_patches(art, scenes, s, visited)
    lab = y >= 0
    f = s.patch_feature_px
    feats = f"{s.patch_px} px patches averaged to {f}x{f} px, bands scaled to [0, 1]"
    return {
        "intrinsic_dimension": {
            "mle": num(mle_dimension(x, s.mle_k)) if len(x) else None,
            "twonn": num(twonn(x)) if len(x) else None,
            "k": s.mle_k,
            "n_patches": len(x),
            "n_features": int(x.shape[1]) if len(x) else 0,
            "features": feats,
        },
        "label_sharpness": {
            "k_f": num(label_sharpness(x[lab], y[lab])) if lab.any() else None,
            "n_patches": int(lab.sum()),
            "field_patches": int((y == 1).sum()),
            "label": "consensus field (probability >= 0.5) on at least half of the patch",
            "features": feats,
        },
        "sample_sites": visited,
    }


def class_balance(art: Artifacts, consensus: dict) -> dict:
    sc = art.table("site_consensus")
    px = consensus.get("pixels_by_class", {})
    total = sum(px.values())
    items = art.table("item_consensus")
    item_counts = (
        {}
        if items is None
        else {str(k): int(v) for k, v in items["label"].value_counts().sort_index().items()}
    )
    counts = [v for v in item_counts.values() if v]
    return {
        "field_share": num(sc["field_fraction"].mean()) if len(sc) else None,
        "field_pixels_by_class": {k: num(v / total) for k, v in px.items()} if total else {},
        "item_classes": item_counts,
        "item_imbalance_ratio": num(max(counts) / min(counts)) if counts else None,
    }


def spatial_balance(art: Artifacts) -> dict:
    sites = art.table("sites")
    rows = []
    for sid, g in sites.groupby("scene_id", sort=True):
        rows.append(
            {
                "scene_id": str(sid),
                "sites": len(g),
                "labelled": int((g["role"] != "unlabelled").sum()),
                "gold": int((g["role"] == "gold").sum()),
            }
        )
    lab = np.array([r["labelled"] for r in rows], float)
    p = lab / lab.sum() if lab.sum() else lab
    h = -(p[p > 0] * np.log(p[p > 0])).sum()
    return {
        "scenes": rows,
        "labelled_entropy": num(h / math.log(len(rows))) if len(rows) > 1 and lab.sum() else None,
        "labelled_share_cv": num(
            np.std([r["labelled"] / r["sites"] for r in rows])
            / max(1e-9, np.mean([r["labelled"] / r["sites"] for r in rows]))
        )
        if rows
        else None,
    }
