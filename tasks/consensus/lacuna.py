"""Lacuna assignment score (Estes et al. 2024) on polygon geometry, formulas reproduced exactly.

score = w_area * Area + w_n * N + w_edge * Edge + w_categorical * Categorical with

* Area: area-weighted overall accuracy (tp + tn) / footprint area;
* N: share of reference fields matched one-to-one (intersection > ``match_overlap`` of both polygons);
* Edge: mean over matched pairs of area(ref ring & lab ring) / area(ref ring), where ref ring = reference
  boundary buffered +-9 m and lab ring = labeller boundary buffered +-0.1 m. Because the labeller ring is
  ~90x thinner than the reference ring, a *perfect* boundary scores ~0.2/18 = 0.011 (the platform's quirk,
  reproduced on purpose; the sound ``boundary_f`` in measures.py is the usable boundary measure);
* Categorical: share of the tp area whose class also agrees (null label = its own "unclassed" class).

Degenerate cases: both sides empty -> every component 1; exactly one side empty -> N = Edge = Categorical
= 0 (Area still computed). Both non-empty without any matched pair -> Edge = 0; with tp = 0 -> Categorical 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from tasks.consensus.params import ConsensusParams

_UNCLASSED = "\x00unclassed"


@dataclass
class PolySet:
    """One side of a comparison: its fields and their classes, clipped to the footprint."""

    geoms: list[BaseGeometry]
    labels: list[str | None]
    union: BaseGeometry

    @classmethod
    def build(cls, polys: Sequence[tuple[BaseGeometry, str | None]], footprint: BaseGeometry) -> PolySet:
        geoms, labels = [], []
        for g, lbl in polys:
            g = shapely.intersection(g, footprint)
            if g.is_empty or g.area <= 0:
                continue
            geoms.append(g)
            labels.append(lbl)
        union = shapely.union_all(geoms) if geoms else shapely.Polygon()
        return cls(geoms, labels, union)

    @property
    def empty(self) -> bool:
        return not self.geoms

    def class_union(self, key: str) -> BaseGeometry:
        parts = [g for g, lbl in zip(self.geoms, self.labels, strict=True) if (lbl or _UNCLASSED) == key]
        return shapely.union_all(parts) if parts else shapely.Polygon()

    def class_keys(self) -> set[str]:
        return {lbl or _UNCLASSED for lbl in self.labels}


def confusion_areas(ref: PolySet, lab: PolySet, footprint: BaseGeometry) -> dict[str, float]:
    """tp/fp/fn/tn in CRS units^2 over the footprint (tn = footprint minus both unions)."""
    total = float(footprint.area)
    a_ref, a_lab = float(ref.union.area), float(lab.union.area)
    tp = float(shapely.intersection(ref.union, lab.union).area) if not (ref.empty or lab.empty) else 0.0
    fn = max(a_ref - tp, 0.0)
    fp = max(a_lab - tp, 0.0)
    tn = max(total - a_ref - a_lab + tp, 0.0)
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "footprint": total}


def match_pairs(
    ref: Sequence[BaseGeometry], lab: Sequence[BaseGeometry], overlap: float
) -> list[tuple[int, int]]:
    """One-to-one pairs whose intersection exceeds ``overlap`` of both areas (greedy by intersection)."""
    if not ref or not lab:
        return []
    tree = shapely.STRtree(list(lab))
    cands = []
    for i, r in enumerate(ref):
        for j in tree.query(r, predicate="intersects"):
            inter = float(shapely.intersection(r, lab[j]).area)
            if inter > overlap * r.area and inter > overlap * lab[j].area:
                cands.append((inter, i, int(j)))
    cands.sort(key=lambda t: (-t[0], t[1], t[2]))
    used_r, used_l, pairs = set(), set(), []
    for _, i, j in cands:
        if i not in used_r and j not in used_l:
            used_r.add(i)
            used_l.add(j)
            pairs.append((i, j))
    return pairs


def ring_edge(ref: BaseGeometry, lab: BaseGeometry, params: ConsensusParams) -> float:
    """Lacuna ring measure for one matched pair (perfect boundary ~ lab_buffer / ref_buffer)."""
    ref_ring = ref.boundary.buffer(params.ref_ring_buffer_m)
    lab_ring = lab.boundary.buffer(params.lab_ring_buffer_m)
    denom = float(ref_ring.area)
    return float(shapely.intersection(ref_ring, lab_ring).area) / denom if denom > 0 else 0.0


def lacuna_components(
    ref: PolySet, lab: PolySet, footprint: BaseGeometry, params: ConsensusParams
) -> dict[str, float]:
    """Lacuna components and weighted score plus the shared confusion areas and match counts."""
    areas = confusion_areas(ref, lab, footprint)
    total = areas["footprint"]
    area_acc = (areas["tp"] + areas["tn"]) / total if total > 0 else 1.0
    pairs: list[tuple[int, int]] = []
    if ref.empty and lab.empty:
        n_acc = edge = cat = 1.0
    elif ref.empty or lab.empty:
        n_acc = edge = cat = 0.0
    else:
        pairs = match_pairs(ref.geoms, lab.geoms, params.match_overlap)
        n_acc = len(pairs) / len(ref.geoms)
        edge = (
            float(np.mean([ring_edge(ref.geoms[i], lab.geoms[j], params) for i, j in pairs]))
            if pairs
            else 0.0
        )
        cat = _categorical(ref, lab, areas["tp"])
    score = params.w_area * area_acc + params.w_n * n_acc + params.w_edge * edge + params.w_categorical * cat
    return {
        "lacuna_area": area_acc,
        "lacuna_n": n_acc,
        "lacuna_edge": edge,
        "lacuna_categorical": cat,
        "lacuna_score": score,
        "n_ref_polygons": len(ref.geoms),
        "n_lab_polygons": len(lab.geoms),
        "n_matched": len(pairs),
        **{f"{k}_m2": v for k, v in areas.items() if k != "footprint"},
        "footprint_m2": total,
    }


def _categorical(ref: PolySet, lab: PolySet, tp: float) -> float:
    if tp <= 0:
        return 0.0
    agree = 0.0
    for key in ref.class_keys() & lab.class_keys():
        agree += float(shapely.intersection(ref.class_union(key), lab.class_union(key)).area)
    return min(agree / tp, 1.0)
