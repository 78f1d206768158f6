"""Confident learning per pixel (Northcutt et al., JAIR 2021) for binary field / background labels.

Every (labeller, pixel) pair is one example: the given class is the labeller's mask, the prediction is the
model's out-of-sample p(field) = p(interior) + p(boundary). With two classes, everything confident learning
needs (per-class thresholds, the confident joint, the noise-rate pruning order) is a function of the given
class and p(field) alone, so a (2, n_bins) histogram of quantised p(field) is an exact sufficient statistic:
batches add histograms, one fit turns the sum into a (2, n_bins) lookup table of flags, and flagging a site
is one fancy index. Probabilities are snapped to bin centres (error <= 1 / (2 n_bins)); that is what makes the
histogram exact rather than approximate. The calibration and pruning rules are those of ``item_issues``.

Flagged pixels then become reviewable regions of one assignment (``assignment_regions``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import shapely
from pydantic import BaseModel, ConfigDict, Field
from rasterio.features import shapes
from scipy import ndimage

from tasks.learn.item_issues import _keep_at_least_n_per_class, _round_preserving_row_totals

BACKGROUND, FIELD = 0, 1
FILTERS = ("prune_by_noise_rate", "confident_learning", "both")
KINDS = ("missed_field", "spurious_field", "boundary", "model_only", "empty_assignment", "possible_spammer")
_EIGHT = np.ones((3, 3), bool)


class IssueParams(BaseModel):
    """Tunables of the label-issues stage (catalog: ``settings.learn.label_issues``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    probability_source: Literal["auto", "oos", "consensus"] = Field(
        "auto",
        description="oos = model probabilities (required); consensus = stand-in; auto = oos if present.",
    )
    filter_by: Literal["prune_by_noise_rate", "confident_learning", "both"] = "prune_by_noise_rate"
    n_bins: int = Field(16384, ge=16, description="p(field) quantisation bins of the sufficient statistic.")
    prob_tolerance: float = Field(1e-3, gt=0, description="Allowed |sum of bands - 1| per pixel.")
    boundary_px: float = Field(2.0, ge=0, description="Region is 'boundary' when within this of an outline.")
    boundary_share: float = Field(0.75, gt=0, le=1, description="Share of a region's pixels in that zone.")
    boundary_min_offset_px: float = Field(
        0.5, ge=0, description="Boundary issue only when flagged px / outline px (mean offset) reaches this."
    )
    min_region_px: int = Field(4, ge=1, description="Smaller regions are dropped (noise).")
    consensus_threshold: float = Field(0.5, gt=0, lt=1, description="Consensus field when prob >= this.")
    corroboration: float = Field(0.5, ge=0, le=1, description="Consensus must back this share of a region.")
    uncorroborated_weight: float = Field(0.5, ge=0, le=1, description="Score weight without a consensus.")
    gold_weighting: bool = Field(
        True, description="Without a consensus, weight = 1 - the labeller's gold iou_pooled when known."
    )
    spammer_fraction: float = Field(
        0.65, gt=0, le=1, description="Flagged share of (drawn or model field) area -> possible spammer."
    )
    spammer_min_px: int = Field(64, ge=1, description="Drawn pixels needed before calling a spammer.")
    empty_min_px: int = Field(
        64, ge=1, description="Flagged pixels needed to call an empty assignment wrong."
    )
    batch_size: int | None = Field(None, ge=1, description="Sites per Dask task; default ingest.batch_size.")
    stats_part_sites: int = Field(
        64, ge=1, description="Sites per label_issue_stats part (a reprocess rewrites the parts it changes)."
    )
    carry_close: float = Field(
        0.01,
        ge=0,
        description="Reprocess without refit: keep the previous fit while its thresholds and flag cut-offs "
        "(p(field) units) moved by at most this.",
    )


def field_probability(probs, name: str = "probabilities", tol: float = 1e-3) -> np.ndarray:
    """p(field) (H, W) float64 from (3, H, W) [background, interior, boundary] or (2, H, W) [background,
    field]; NaN in any band = no prediction (NaN out). Raise ``ValueError`` naming the first bad pixel."""
    p = np.asarray(probs)
    if p.ndim != 3 or p.shape[0] not in (2, 3):
        raise ValueError(f"{name}: expected (3, H, W) or (2, H, W) class probabilities; got shape {p.shape}")
    if not np.issubdtype(p.dtype, np.number):
        raise ValueError(f"{name}: probabilities must be numeric; got dtype {p.dtype}")
    p = p.astype(np.float64)
    if np.isinf(p).any():
        raise ValueError(f"{name}: pixel {_where(np.isinf(p).any(axis=0))} is infinite")
    valid = np.isfinite(p).all(axis=0)
    bad = valid & ((p < -tol) | (p > 1 + tol)).any(axis=0)
    if bad.any():
        raise ValueError(f"{name}: pixel {_where(bad)} has a probability outside [0, 1]")
    bad = valid & (np.abs(p.sum(axis=0) - 1) > tol)
    if bad.any():
        raise ValueError(f"{name}: pixel {_where(bad)} bands sum to {p.sum(axis=0)[bad][0]:.4f}, not 1")
    pf = np.clip(p[1:].sum(axis=0), 0.0, 1.0)
    pf[~valid] = np.nan
    return pf


def _where(mask: np.ndarray) -> str:
    r, c = np.argwhere(mask)[0]
    return f"(row {r}, col {c})"


def quantise(p_field: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index of p(field) in [0, n_bins); -1 where NaN (no prediction / outside the footprint)."""
    p = np.asarray(p_field, np.float64)
    ok = np.isfinite(p)
    out = np.full(p.shape, -1, np.int32)
    out[ok] = np.clip(np.floor(p[ok] * n_bins), 0, n_bins - 1)
    return out


def bin_centres(n_bins: int) -> np.ndarray:
    return (np.arange(n_bins) + 0.5) / n_bins


@dataclass
class PixelStats:
    """hist[given class, p(field) bin] = pixel count; sums of batches are exact."""

    hist: np.ndarray

    @classmethod
    def zeros(cls, n_bins: int) -> PixelStats:
        return cls(np.zeros((2, n_bins), np.int64))

    def add(self, bins: np.ndarray, given: np.ndarray) -> None:
        ok = bins >= 0
        n = self.hist.shape[1]
        idx = given[ok].astype(np.int64) * n + bins[ok]
        self.hist += np.bincount(idx, minlength=2 * n).reshape(2, n)

    def __add__(self, other: PixelStats) -> PixelStats:
        return PixelStats(self.hist + other.hist)

    def encode(self) -> tuple[bytes, bytes]:
        """Sparse bytes (flat cell indices uint32, counts int64; little-endian) of the non-zero cells."""
        flat = self.hist.ravel()
        nz = np.flatnonzero(flat)
        return nz.astype("<u4").tobytes(), flat[nz].astype("<i8").tobytes()

    @classmethod
    def decode(cls, n_bins: int, cells: bytes, counts: bytes) -> PixelStats:
        flat = np.zeros(2 * n_bins, np.int64)
        flat[np.frombuffer(cells, "<u4").astype(np.int64)] = np.frombuffer(counts, "<i8")
        return cls(flat.reshape(2, n_bins))


@dataclass(frozen=True)
class PixelCL:
    """A fitted pixel confident-learning model: thresholds, calibrated joint [given, true], prune counts
    [true, given], lookup tables over (given class, bin) of flags and margins t_given - self-confidence."""

    thresholds: np.ndarray
    joint: np.ndarray
    prune: np.ndarray
    flag_lut: np.ndarray
    margin_lut: np.ndarray
    filter_by: str
    n_given: np.ndarray = field(default_factory=lambda: np.zeros(2, np.int64))

    @property
    def n_bins(self) -> int:
        return self.flag_lut.shape[1]

    def flags(self, bins: np.ndarray, given: np.ndarray) -> np.ndarray:
        out = np.zeros(bins.shape, bool)
        ok = bins >= 0
        out[ok] = self.flag_lut[given[ok].astype(np.int64), bins[ok]]
        return out

    def margins(self, bins: np.ndarray, given: np.ndarray) -> np.ndarray:
        out = np.full(bins.shape, np.nan)
        ok = bins >= 0
        out[ok] = self.margin_lut[given[ok].astype(np.int64), bins[ok]]
        return out


def fit_summary(model: PixelCL) -> np.ndarray:
    """What a fit decides, in p(field) units: [t_background, t_field, the highest p(field) flagged on the
    labeller's field side (0 = none), the lowest flagged on the background side (1 = none)]. ``carry_close``
    compares these between a refit and the fit in use."""
    c = bin_centres(model.n_bins)
    on_field, on_background = c[model.flag_lut[FIELD]], c[model.flag_lut[BACKGROUND]]
    return np.array(
        [
            *np.asarray(model.thresholds, float),
            on_field.max() if on_field.size else 0.0,
            on_background.min() if on_background.size else 1.0,
        ]
    )


def fit_pixel_cl(stats: PixelStats, filter_by: str = "prune_by_noise_rate") -> PixelCL:
    """Thresholds, calibrated confident joint and prune counts exactly as ``item_issues`` /
    cleanlab compute them on the same examples; ties at a pruning cut are all flagged."""
    if filter_by not in FILTERS:
        raise ValueError(f"unknown filter_by {filter_by!r}; choose one of {', '.join(FILTERS)}")
    hist = stats.hist.astype(np.float64)
    n_bins = hist.shape[1]
    c = bin_centres(n_bins)
    self_conf = np.stack([1 - c, c])  # [given class, bin] -> p(given class)
    n_given = stats.hist.sum(axis=1)
    sums = (hist * self_conf).sum(axis=1)
    t = np.clip(np.divide(sums, n_given, out=np.full(2, 2.0), where=n_given > 0), 2e-6, None)
    above = self_conf >= t[:, None] - 1e-6  # [true class j, bin]: p_j reaches j's threshold
    guess = np.where(above.all(axis=0), (c > 0.5).astype(int), np.where(above[FIELD], FIELD, BACKGROUND))
    counted = above.any(axis=0)
    cj = np.array([[hist[k, counted & (guess == j)].sum() for j in (0, 1)] for k in (0, 1)], np.int64)
    np.fill_diagonal(cj, np.maximum(cj.diagonal(), 1))
    n = n_given.sum()
    cal = cj / np.clip(cj.sum(axis=1, keepdims=True), 1e-100, None) * n_given[:, None]
    cal = cal / np.clip(cal.sum(), 1e-100, None) * n
    joint = _round_preserving_row_totals(cal)
    prune = _keep_at_least_n_per_class(joint.T, 1)

    off_diag = np.stack([counted & (guess == FIELD), counted & (guess == BACKGROUND)])
    by_rate = np.zeros((2, n_bins), bool)
    for k, order in ((FIELD, np.arange(n_bins)), (BACKGROUND, np.arange(n_bins)[::-1])):
        m = int(prune[1 - k, k])  # pixels given k to flag as truly the other class, largest margin first
        if n_given[k] <= 1 or m <= 0:
            continue
        cut = int(np.searchsorted(np.cumsum(stats.hist[k, order]), m))
        by_rate[k, order[: cut + 1]] = True
    if filter_by == "prune_by_noise_rate":
        lut = by_rate
    elif filter_by == "confident_learning":
        lut = off_diag
    else:
        lut = by_rate & off_diag
    lut = lut & np.stack([c > 0.5, c < 0.5])  # never flag a pixel whose given class is the argmax
    margin = t[:, None] - self_conf
    return PixelCL(t, joint, prune, lut, margin, filter_by, n_given)


def boundary_zone(given: np.ndarray, valid: np.ndarray, width_px: float) -> tuple[np.ndarray, np.ndarray]:
    """(edge, zone): pixels next to the labeller's outline (both sides of it) and those within ``width_px``
    of one; edges along the footprint or grid border are not outlines."""
    edge = np.zeros(given.shape, bool)
    for ax in (0, 1):
        a = [slice(None)] * 2
        b = [slice(None)] * 2
        a[ax], b[ax] = slice(1, None), slice(None, -1)
        diff = (given[tuple(a)] != given[tuple(b)]) & valid[tuple(a)] & valid[tuple(b)]
        edge[tuple(a)] |= diff
        edge[tuple(b)] |= diff
    if not edge.any():
        return edge, edge.copy()
    return edge, ndimage.distance_transform_edt(~edge) <= width_px


def _mode_per_label(labels: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Most frequent non-zero value per label 1..n (0 when none); ties -> smallest value."""
    sel = (labels > 0) & (values > 0)
    out = np.zeros(n + 1, np.int64)
    if not sel.any():
        return out
    pairs, counts = np.unique(np.stack([labels[sel], values[sel]]), axis=1, return_counts=True)
    order = np.lexsort((pairs[1], -counts, pairs[0]))
    lab, first = np.unique(pairs[0][order], return_index=True)
    out[lab] = pairs[1][order][first]
    return out


def region_geometries(groups: np.ndarray, n: int, transform) -> list:
    """One (Multi)Polygon per group id 1..n, pixel-exact, in the grid's CRS."""
    parts: list[list] = [[] for _ in range(n + 1)]
    for geom, val in shapes(groups.astype(np.int32), mask=groups > 0, connectivity=4, transform=transform):
        rings = geom["coordinates"]
        parts[int(val)].append(shapely.Polygon(rings[0], rings[1:]))
    # 4-connected pieces of one value meet at most at a corner, so the MultiPolygon is valid as is
    return [None if not p else p[0] if len(p) == 1 else shapely.MultiPolygon(p) for p in parts[1:]]


def assignment_regions(
    bins: np.ndarray,
    polygon_ids: np.ndarray,
    consensus: np.ndarray | None,
    model: PixelCL,
    params: IssueParams,
    transform,
    pixel_area: float,
) -> tuple[list[dict], dict]:
    """Issues of one assignment and its summary.

    ``bins``: quantised p(field), -1 outside the footprint / without prediction; ``polygon_ids``: 1-based
    index of the labeller's polygon per pixel (0 = background); ``consensus``: consensus field mask, or
    None when the site has no consensus independent of this labeller. Flagged pixels form 8-connected
    regions per side (labeller background / field); a region mostly within ``boundary_px`` of the
    labeller's outline joins its nearest polygon's single ``boundary`` issue, the rest are missed or
    spurious fields (``model_only`` when the consensus sides with the labeller).
    Score = area_m2 x mean(t_given - p_given) x weight, weight = consensus agreement share (or
    ``uncorroborated_weight`` without consensus; ``uncorroborated_base`` keeps the unweighted part so
    the ranking can swap in the labeller's gold record). Records carry 1-based ``polygon`` indices.
    """
    valid = bins >= 0
    given = (polygon_ids > 0) & valid
    flag = model.flags(bins, given.astype(np.int8))
    pf = np.where(valid, bin_centres(model.n_bins)[np.clip(bins, 0, None)], 0.0)
    margin = np.where(flag, model.margins(bins, given.astype(np.int8)), 0.0)
    edge, zone = boundary_zone(given, valid, params.boundary_px)
    outline = np.bincount(polygon_ids[edge & given].ravel(), minlength=int(polygon_ids.max()) + 1)
    missed, n_m = ndimage.label(flag & ~given, structure=_EIGHT)
    spur, n_s = ndimage.label(flag & given, structure=_EIGHT)
    comp = missed + np.where(spur > 0, spur + n_m, 0)
    n_c = n_m + n_s
    n_valid, drawn = int(valid.sum()), int(given.sum())
    summary = {
        "n_pixels": n_valid,
        "flagged_pixels": int(flag.sum()),
        "flagged_fraction": flag.sum() / n_valid if n_valid else 0.0,
        "drawn_fraction": drawn / n_valid if n_valid else 0.0,
        "flagged_drawn_fraction": (flag & given).sum() / drawn if drawn else 0.0,
        "flagged_union_fraction": flag.sum() / max(int((given | (valid & (pf >= 0.5))).sum()), 1),
        "model_field_fraction": float((pf[valid] >= 0.5).mean()) if n_valid else 0.0,
        "consensus_field_fraction": (
            float(consensus[valid].mean()) if consensus is not None and n_valid else None
        ),
        "summary_kind": None,
    }
    if n_c == 0:
        return [], summary
    flat = comp.ravel()
    npx = np.bincount(flat, minlength=n_c + 1)
    in_zone = np.bincount(flat, weights=zone.ravel(), minlength=n_c + 1)
    if polygon_ids.any():
        _, (ri, ci) = ndimage.distance_transform_edt(polygon_ids == 0, return_indices=True)
        nearest = polygon_ids[ri, ci]
    else:
        nearest = np.zeros_like(polygon_ids)
    near_poly = _mode_per_label(comp, nearest, n_c)
    # a region covering most of a drawn polygon is that polygon being wrong, not its outline
    poly_px = np.bincount(polygon_ids[valid].ravel(), minlength=int(polygon_ids.max()) + 1)
    whole = (np.arange(n_c + 1) > n_m) & (npx >= 0.75 * np.maximum(poly_px[near_poly], 1))
    is_boundary = (in_zone >= params.boundary_share * npx) & (near_poly > 0) & ~whole
    is_boundary[0] = False
    # group ids: boundary regions merge per nearest polygon, other regions stay alone
    keys: dict[tuple, int] = {}
    comp_group = np.zeros(n_c + 1, np.int64)
    for cid in range(1, n_c + 1):
        key = ("b", int(near_poly[cid])) if is_boundary[cid] else ("c", cid)
        comp_group[cid] = keys.setdefault(key, len(keys) + 1)
    groups = comp_group[comp]
    n_g = len(keys)
    gflat = groups.ravel()

    def gsum(w):
        return np.bincount(gflat, weights=np.ravel(w), minlength=n_g + 1)

    g_px = np.bincount(gflat, minlength=n_g + 1)
    g_poly = np.zeros(n_g + 1, np.int64)  # polygon of a boundary group, 0 for other groups
    for (tag, key), gid in keys.items():
        g_poly[gid] = key if tag == "b" else 0
    g_offset = g_px / np.maximum(outline[g_poly], 1)  # mean displacement of the outline, pixels
    keep = (g_px >= params.min_region_px) & ((g_poly == 0) | (g_offset >= params.boundary_min_offset_px))
    keep[0] = False
    groups = np.where(keep[groups], groups, 0)
    g_margin, g_pf, g_zone, g_missed = gsum(margin), gsum(pf), gsum(zone), gsum(~given)
    g_agree = gsum(consensus != given) if consensus is not None else None
    g_inside = _mode_per_label(groups, polygon_ids, n_g)
    geoms = region_geometries(groups, n_g, transform)
    records = []
    for (tag, key), gid in keys.items():
        if not keep[gid]:
            continue
        n = int(g_px[gid])
        agreement = float(g_agree[gid] / n) if g_agree is not None else None
        offset = float(g_offset[gid]) if tag == "b" else None
        if tag == "b":
            kind, poly = "boundary", key
        elif agreement is not None and agreement < params.corroboration:
            kind, poly = "model_only", int(g_inside[gid]) or None
        else:
            missed_side = g_missed[gid] * 2 > n
            kind, poly = ("missed_field", None) if missed_side else ("spurious_field", int(g_inside[gid]))
        weight = agreement if agreement is not None else params.uncorroborated_weight
        mean_margin = float(g_margin[gid] / n)
        records.append(
            {
                "kind": kind,
                "polygon": poly,
                "n_pixels": n,
                "area_m2": n * pixel_area,
                "mean_p_field": float(g_pf[gid] / n),
                "mean_margin": mean_margin,
                "consensus_agreement": agreement,
                "zone_share": float(g_zone[gid] / n),
                "offset_px": offset,
                "score": n * pixel_area * mean_margin * weight,
                "uncorroborated_base": n * pixel_area * mean_margin if agreement is None else 0.0,
                "geometry": geoms[gid - 1],
            }
        )
    return _fold(records, summary, drawn, params), summary


def _fold(records: list[dict], summary: dict, drawn: int, params: IssueParams) -> list[dict]:
    """Replace an assignment's regions by one whole-assignment issue when the assignment itself is wrong:
    ``empty_assignment`` ("no fields here" while model and consensus see fields) or ``possible_spammer``
    (flagged pixels cover most of the area where the labeller or the model sees a field)."""
    kind = None
    missed = [r for r in records if r["kind"] == "missed_field"]
    if drawn == 0 and sum(r["n_pixels"] for r in missed) >= params.empty_min_px:
        kind = "empty_assignment"
    elif drawn >= params.spammer_min_px and summary["flagged_union_fraction"] >= params.spammer_fraction:
        kind = "possible_spammer"
    if kind is None or not records:
        return records
    summary["summary_kind"] = kind
    n = sum(r["n_pixels"] for r in records)
    agree = [
        r["consensus_agreement"] * r["n_pixels"] for r in records if r["consensus_agreement"] is not None
    ]
    return [
        {
            "kind": kind,
            "polygon": None,
            "n_pixels": n,
            "area_m2": sum(r["area_m2"] for r in records),
            "mean_p_field": sum(r["mean_p_field"] * r["n_pixels"] for r in records) / n,
            "mean_margin": sum(r["mean_margin"] * r["n_pixels"] for r in records) / n,
            "consensus_agreement": sum(agree) / n if len(agree) == len(records) else None,
            "zone_share": sum(r["zone_share"] * r["n_pixels"] for r in records) / n,
            "score": sum(r["score"] for r in records),
            "uncorroborated_base": sum(r["uncorroborated_base"] for r in records),
            "geometry": shapely.union_all([r["geometry"] for r in records]),
            "regions": {k: sum(r["kind"] == k for r in records) for k in KINDS[:4]},
        }
    ]
