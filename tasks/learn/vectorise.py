"""Probabilities -> field instances -> polygons with a confidence; polygon matching; precision thresholds.

Instances: 4-connected components of pixels whose most likely class is *interior*; the boundary class
between two touching fields is what keeps them apart. Each component then grows back over the field
pixels (interior + boundary >= 0.5) within ``grow_px``, nearest component first, so a polygon covers the
whole field rather than its core. The same function turns a target class map into target instances,
so predictions and targets are compared on equal terms.
"""

from __future__ import annotations

import numpy as np
import shapely
from rasterio.features import shapes
from scipy import ndimage

from tasks.store.grid import SiteGrid

FOUR = ndimage.generate_binary_structure(2, 1)


def instances(prob: np.ndarray, grow_px: int = 2, min_px: int = 12) -> np.ndarray:
    """int32 instance ids (0 = none) from class probabilities (3, H, W); NaN pixels are never field."""
    p = np.nan_to_num(prob, nan=0.0)
    p[0][~np.isfinite(prob).all(axis=0)] = 1.0
    field = p[1] + p[2] >= 0.5
    core = field & (p[1] >= p[0]) & (p[1] >= p[2])
    ids, n = ndimage.label(core, structure=FOUR)
    if n and grow_px:
        dist, (iy, ix) = ndimage.distance_transform_edt(ids == 0, return_indices=True)
        grow = field & (ids == 0) & (dist <= grow_px)
        ids[grow] = ids[iy[grow], ix[grow]]
    if n:
        sizes = np.bincount(ids.ravel(), minlength=n + 1)
        keep = sizes >= min_px
        keep[0] = False
        remap = np.zeros(n + 1, np.int32)
        remap[keep] = np.arange(1, keep.sum() + 1, dtype=np.int32)
        ids = remap[ids]
    return ids.astype(np.int32)


def target_instances(target: np.ndarray, grow_px: int = 2, min_px: int = 12) -> np.ndarray:
    """Instances of a target class map (0/1/2), through the same rule as predictions."""
    onehot = np.stack([target == c for c in range(3)]).astype(np.float32)
    return instances(onehot, grow_px, min_px)


def instance_confidence(ids: np.ndarray, prob: np.ndarray, kind: str = "certainty") -> np.ndarray:
    """Confidence of each instance 1..n: mean over its pixels of the winning class's probability.

    ``certainty`` (default) also drops when interior and boundary compete inside a polygon, i.e. for
    merged or fragmented fields, which mean field probability (``kind="field"``: interior + boundary)
    cannot see; on the demo's gold sites it ranks true polygons better (ROC AUC 0.90 vs 0.86).
    """
    n = int(ids.max())
    if n == 0:
        return np.zeros(0)
    p = np.nan_to_num(prob, nan=0.0)
    score = p.max(axis=0) if kind == "certainty" else p[1] + p[2]
    return np.asarray(ndimage.mean(score, labels=ids, index=np.arange(1, n + 1)), dtype=np.float64)


def polygons(ids: np.ndarray, grid: SiteGrid) -> list[shapely.Polygon]:
    """One polygon per instance 1..n (pixel-exact edges, holes kept, native CRS of the grid).

    Growth can leave a diagonal-only pixel, which vectorises as a second piece: the largest piece wins.
    """
    n = int(ids.max())
    best: list[shapely.Polygon | None] = [None] * n
    for geom, val in shapes(ids, mask=ids > 0, connectivity=4, transform=grid.affine):
        poly = shapely.geometry.shape(geom)
        i = int(val) - 1
        if best[i] is None or poly.area > best[i].area:
            best[i] = poly
    return best


def best_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best IoU of every predicted instance (1..n) with any true instance, and vice versa (1..m)."""
    n, m = int(pred.max()), int(truth.max())
    bp, bt = np.zeros(n), np.zeros(m)
    if n == 0 or m == 0:
        return bp, bt
    ap = np.bincount(pred.ravel(), minlength=n + 1)
    at = np.bincount(truth.ravel(), minlength=m + 1)
    both = (pred > 0) & (truth > 0)
    pair = pred[both].astype(np.int64) * (m + 1) + truth[both]
    keys, inter = np.unique(pair, return_counts=True)
    pi, ti = keys // (m + 1), keys % (m + 1)
    iou = inter / (ap[pi] + at[ti] - inter)
    np.maximum.at(bp, pi - 1, iou)
    np.maximum.at(bt, ti - 1, iou)
    return bp, bt


def wilson_lower(k: np.ndarray, n: np.ndarray, z: float) -> np.ndarray:
    """One-sided Wilson lower bound of a proportion k/n (z = 1.2816 for 90 %); z = 0 gives k/n."""
    n = np.maximum(np.asarray(n, np.float64), 1.0)
    p = np.asarray(k, np.float64) / n
    if z == 0:
        return p
    centre = p + z * z / (2 * n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n)


def choose_threshold(
    confidence: np.ndarray,
    is_tp: np.ndarray,
    n_targets: int,
    target_precision: float,
    min_support: int,
    z: float = 0.0,
) -> dict:
    """Lowest confidence threshold whose kept polygons reach ``target_precision`` (on >= min_support).

    With ``z > 0`` the one-sided Wilson lower bound of the precision must reach the target, so a threshold
    resting on few polygons is not trusted on luck. Returns threshold, precision (point estimate), its
    lower bound, recall and n_polygons kept. When no threshold reaches the target the threshold is +inf
    (nothing is kept) and precision is NaN: a defined result the caller reports, never a lowered bar.
    """
    conf = np.asarray(confidence, np.float64)
    tp = np.asarray(is_tp, bool)
    order = np.argsort(-conf, kind="stable")
    c, t = conf[order], tp[order]
    k = np.arange(1, len(c) + 1)
    n_tp = np.cumsum(t)
    prec = n_tp / np.maximum(k, 1)
    bound = wilson_lower(n_tp, k, z)
    last_of_tie = np.r_[c[1:] < c[:-1], True] if len(c) else np.zeros(0, bool)
    ok = last_of_tie & (k >= min_support) & (bound >= target_precision)
    if not ok.any():
        nan = float("nan")
        return {
            "threshold": float("inf"),
            "precision": nan,
            "precision_lower": nan,
            "recall": 0.0,
            "n_polygons": 0,
        }
    i = int(np.flatnonzero(ok)[-1])
    return {
        "threshold": float(c[i]),
        "precision": float(prec[i]),
        "precision_lower": float(bound[i]),
        "recall": float(n_tp[i] / n_targets) if n_targets else float("nan"),
        "n_polygons": int(i + 1),
    }


def precision_at(confidence: np.ndarray, is_tp: np.ndarray, n_targets: int, threshold: float) -> dict:
    """Precision and recall of the polygons at or above ``threshold`` (NaN precision when none)."""
    kept = np.asarray(confidence, np.float64) >= threshold
    tp = np.asarray(is_tp, bool)
    n = int(kept.sum())
    return {
        "precision": float(tp[kept].mean()) if n else float("nan"),
        "recall": float(tp[kept].sum() / n_targets) if n_targets else float("nan"),
        "n_polygons": n,
    }
