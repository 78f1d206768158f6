"""Sound per-assignment measures vs the reference, and the assignment_quality rows of gold sites.

Degenerate-case values (no NaN is ever produced):

* IoU = tp / (tp + fp + fn); both sides empty -> 1.
* field skill FS = tp / (tp + fn); no reference field (tp + fn = 0) -> 1 (nothing could be missed).
* no-field skill NFS = tn / (tn + fp); reference covers the whole footprint -> 1 (nothing could be added).
* TSS = FS + NFS - 1 in [-1, 1]; hence empty-vs-empty -> 1, and fields drawn on an empty reference give
  TSS = NFS (1 minus the share of the footprint wrongly drawn).
* boundary F at tau pixels: boundaries (footprint outline excluded) burnt on the site grid; precision =
  share of labeller boundary pixels within tau of a reference boundary pixel (Euclidean distance
  transform), recall the converse, F = harmonic mean. Both without boundary -> 1; exactly one -> 0.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from tasks.consensus.lacuna import PolySet, lacuna_components
from tasks.consensus.params import ConsensusParams
from tasks.consensus.rasterise import boundary_raster
from tasks.consensus.site import SiteInput


def iou_from_areas(tp: float, fp: float, fn: float) -> float:
    denom = tp + fp + fn
    return tp / denom if denom > 0 else 1.0


def skills_from_areas(tp: float, fp: float, fn: float, tn: float) -> tuple[float, float, float]:
    """(field skill, no-field skill, TSS) with the vacuous cases set to 1 (see module doc)."""
    fs = tp / (tp + fn) if tp + fn > 0 else 1.0
    nfs = tn / (tn + fp) if tn + fp > 0 else 1.0
    return fs, nfs, fs + nfs - 1.0


def boundary_f(ref_b: np.ndarray, lab_b: np.ndarray, tau_px: float) -> tuple[float, float, float]:
    """(precision, recall, F) of boundary pixels within ``tau_px`` pixels."""
    n_ref, n_lab = int(ref_b.sum()), int(lab_b.sum())
    if n_ref == 0 and n_lab == 0:
        return 1.0, 1.0, 1.0
    if n_ref == 0 or n_lab == 0:
        return 0.0, 0.0, 0.0
    d_ref = ndimage.distance_transform_edt(~ref_b)
    d_lab = ndimage.distance_transform_edt(~lab_b)
    precision = float((d_ref[lab_b] <= tau_px).mean())
    recall = float((d_lab[ref_b] <= tau_px).mean())
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f


def compare(ref: PolySet, lab: PolySet, site: SiteInput, params: ConsensusParams) -> dict[str, float]:
    """All measures of one labeller polygon set against the reference on one site."""
    row = lacuna_components(ref, lab, site.footprint, params)
    tp, fp, fn, tn = row["tp_m2"], row["fp_m2"], row["fn_m2"], row["tn_m2"]
    row["iou"] = iou_from_areas(tp, fp, fn)
    row["field_skill"], row["nofield_skill"], row["tss"] = skills_from_areas(tp, fp, fn, tn)
    key = ("ref_boundary", id(ref))
    if key not in site._cache:
        site._cache[key] = boundary_raster(site.grid, ref.geoms, site.footprint)
    lab_b = boundary_raster(site.grid, lab.geoms, site.footprint)
    row["boundary_precision"], row["boundary_recall"], row["boundary_f"] = boundary_f(
        site._cache[key], lab_b, params.boundary_tolerance_px
    )
    return row


def assignment_quality_rows(site: SiteInput, params: ConsensusParams) -> list[dict]:
    """One row per completed non-reference assignment of a gold site (empty list for other sites)."""
    ref_id = site.reference_id
    if ref_id is None:
        return []
    ref = PolySet.build(site.polygons(ref_id), site.footprint)
    rows = []
    for lab_id in site.voters:
        lab = PolySet.build(site.polygons(lab_id), site.footprint)
        row = {
            "site_id": site.site_id,
            "labeller_id": lab_id,
            "reference_id": ref_id,
            "completed_at": site.completed_at(lab_id),
        }
        row.update(compare(ref, lab, site, params))
        rows.append(row)
    return rows
