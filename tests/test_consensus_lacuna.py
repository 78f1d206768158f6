"""Hand-computed Lacuna cases and the sound per-assignment measures (1 m pixels, 100 x 100 m site)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import shapely

from tasks.consensus.lacuna import PolySet, lacuna_components, match_pairs
from tasks.consensus.measures import assignment_quality_rows, boundary_f, compare
from tasks.consensus.params import ConsensusParams
from tasks.consensus.rasterise import boundary_raster
from tasks.consensus.site import make_site
from tasks.store.grid import SiteGrid

P = ConsensusParams()
GRID = SiteGrid("s", "EPSG:32633", (1.0, 0.0, 0.0, 0.0, -1.0, 100.0), 100, 100)
FP = shapely.box(0, 0, 100, 100)


def ring(side: float, d: float) -> float:
    """Exact area of a square boundary buffered by d on both sides: 8 s d + (pi - 4) d^2.

    Shapely's arc approximation at the 4 outer corners differs by < 0.02 %, hence rel=1e-3 below.
    """
    return 8 * side * d + (math.pi - 4) * d * d


def sq(x0, y0, side):
    return shapely.box(x0, y0, x0 + side, y0 + side)


def comp(ref, lab):
    return lacuna_components(PolySet.build(ref, FP), PolySet.build(lab, FP), FP, P)


def site_with(ref, lab):
    rows = [(f"r{i}", "s", "expert", c, g) for i, (g, c) in enumerate(ref)]
    rows += [(f"l{i}", "s", "bob", c, g) for i, (g, c) in enumerate(lab)]
    labels = pd.DataFrame(rows, columns=["polygon_id", "site_id", "labeller_id", "label", "geometry"])
    asg = pd.DataFrame(
        [("s", "expert", "completed", True), ("s", "bob", "completed", False)],
        columns=["site_id", "labeller_id", "status", "is_reference"],
    )
    return make_site(GRID, labels, asg)


def test_identical_squares_edge_quirk():
    a = [(sq(20, 20, 40), "crop")]
    c = comp(a, a)
    edge = ring(40, 0.1) / ring(40, 9.0)  # lab ring lies inside the ref ring
    assert c["lacuna_area"] == pytest.approx(1.0)
    assert c["lacuna_n"] == 1.0 and c["lacuna_categorical"] == pytest.approx(1.0)
    assert c["lacuna_edge"] == pytest.approx(edge, rel=1e-3)
    assert 0.010 < c["lacuna_edge"] < 0.012  # a perfect boundary scores ~0.011
    assert c["lacuna_score"] == pytest.approx(0.55 + 0.225 + 0.1 * c["lacuna_edge"] + 0.125, rel=1e-12)
    assert c["lacuna_score"] == pytest.approx(0.90114, abs=1e-4)


def test_offset_squares():
    c = comp([(sq(20, 20, 40), "crop")], [(sq(30, 20, 40), "crop")])
    # tp 1200, fp 400, fn 400, tn 8000; overlap 0.75 of both -> matched.
    assert c["lacuna_area"] == pytest.approx(0.92)
    assert c["lacuna_n"] == 1.0 and c["lacuna_categorical"] == pytest.approx(1.0)
    # lab boundary inside the ref ring: top 39 + bottom 39 + left 2 * 9 = 96 m of a 0.2 m band.
    assert c["lacuna_edge"] == pytest.approx(96 * 0.2 / ring(40, 9.0), abs=1e-4)
    assert c["lacuna_score"] == pytest.approx(0.55 * 0.92 + 0.225 + 0.1 * c["lacuna_edge"] + 0.125)


def test_nested_small_inside_not_matched():
    c = comp([(sq(20, 20, 40), "crop")], [(sq(30, 30, 20), "crop")])
    assert c["n_matched"] == 0 and c["lacuna_n"] == 0.0 and c["lacuna_edge"] == 0.0
    assert c["lacuna_area"] == pytest.approx(0.88)
    assert c["lacuna_categorical"] == pytest.approx(1.0)
    assert c["lacuna_score"] == pytest.approx(0.55 * 0.88 + 0.125)


def test_nested_large_outside_matched_ring_fully_inside():
    c = comp([(sq(20, 20, 40), "crop")], [(sq(15, 15, 50), "crop")])
    assert c["lacuna_n"] == 1.0 and c["lacuna_area"] == pytest.approx(0.91)
    assert c["lacuna_edge"] == pytest.approx(ring(50, 0.1) / ring(40, 9.0), rel=1e-3)


def test_empty_vs_empty_is_one_everywhere():
    c = comp([], [])
    for k in ("lacuna_area", "lacuna_n", "lacuna_edge", "lacuna_categorical", "lacuna_score"):
        assert c[k] == pytest.approx(1.0)
    row = assignment_quality_rows(site_with([], []), P)[0]
    assert row["iou"] == 1.0 and row["tss"] == 1.0 and row["boundary_f"] == 1.0


def test_one_side_empty():
    c = comp([(sq(20, 20, 40), "crop")], [])
    assert c["lacuna_area"] == pytest.approx(0.84)
    assert (c["lacuna_n"], c["lacuna_edge"], c["lacuna_categorical"]) == (0.0, 0.0, 0.0)
    assert c["lacuna_score"] == pytest.approx(0.55 * 0.84)
    missed = assignment_quality_rows(site_with([(sq(20, 20, 40), "crop")], []), P)[0]
    assert missed["iou"] == 0.0 and missed["field_skill"] == 0.0 and missed["nofield_skill"] == 1.0
    assert missed["tss"] == 0.0 and missed["boundary_f"] == 0.0
    extra = assignment_quality_rows(site_with([], [(sq(20, 20, 40), "crop")]), P)[0]
    assert extra["lacuna_area"] == pytest.approx(0.84) and extra["lacuna_n"] == 0.0
    assert extra["field_skill"] == 1.0 and extra["tss"] == pytest.approx(0.84)


def test_categorical_wrong_class():
    ref = [(sq(10, 10, 30), "crop"), (sq(60, 60, 20), "fallow")]
    lab = [(sq(10, 10, 30), "crop"), (sq(60, 60, 20), "crop")]
    c = comp(ref, lab)
    assert c["lacuna_categorical"] == pytest.approx(900 / 1300)
    assert c["lacuna_n"] == 1.0 and c["lacuna_area"] == pytest.approx(1.0)
    edge = (ring(30, 0.1) / ring(30, 9) + ring(20, 0.1) / ring(20, 9)) / 2
    assert c["lacuna_edge"] == pytest.approx(edge, rel=1e-3)
    # null label = its own "unclassed" class
    c2 = comp([(sq(10, 10, 30), None)], [(sq(10, 10, 30), None)])
    assert c2["lacuna_categorical"] == pytest.approx(1.0)


def test_match_is_one_to_one():
    ref = [sq(0, 0, 10)]
    lab = [sq(0, 0, 10), sq(0, 0, 10)]
    assert match_pairs(ref, lab, 0.5) == [(0, 0)]


def test_sound_measures_offset_squares():
    row = assignment_quality_rows(site_with([(sq(20, 20, 40), "crop")], [(sq(30, 20, 40), "crop")]), P)[0]
    assert row["iou"] == pytest.approx(0.6)
    assert row["field_skill"] == pytest.approx(0.75)
    assert row["nofield_skill"] == pytest.approx(8000 / 8400)
    assert row["tss"] == pytest.approx(0.75 + 8000 / 8400 - 1)
    assert 0.0 < row["boundary_f"] < 1.0


def test_boundary_f_perfect_and_tolerance():
    a = [(sq(20, 20, 40), "crop")]
    assert assignment_quality_rows(site_with(a, a), P)[0]["boundary_f"] == 1.0
    ref_b = boundary_raster(GRID, [sq(20, 20, 40)], FP)
    one_px = boundary_raster(GRID, [sq(21, 20, 40)], FP)
    assert boundary_f(ref_b, one_px, 2.0)[2] == 1.0  # within tau
    p, r, f = boundary_f(ref_b, one_px, 0.0)
    # vertical edges (41 px each of 164) miss at tau 0, horizontal ones shift by one pixel at their ends
    assert 0.0 < f < 1.0 and p == pytest.approx(r, abs=0.02)
    far = boundary_raster(GRID, [sq(30, 20, 40)], FP)
    assert boundary_f(ref_b, far, 2.0)[2] < boundary_f(ref_b, far, 9.0)[2] <= 1.0


def test_boundary_ignores_footprint_outline():
    """A field clipped by the site edge has no boundary there: identical clipped fields score 1."""
    a = [(sq(0, 0, 40), "crop")]
    b = boundary_raster(GRID, [sq(0, 0, 40)], FP)
    assert 78 <= b.sum() <= 82  # top and right edges only (2 x 40 px), not the 160 of a free square
    assert assignment_quality_rows(site_with(a, a), P)[0]["boundary_f"] == 1.0


def test_compare_is_symmetric_in_iou():
    s = site_with([], [])
    r1 = compare(
        PolySet.build([(sq(5, 5, 30), "crop")], FP), PolySet.build([(sq(10, 5, 30), "crop")], FP), s, P
    )
    r2 = compare(
        PolySet.build([(sq(10, 5, 30), "crop")], FP), PolySet.build([(sq(5, 5, 30), "crop")], FP), s, P
    )
    assert r1["iou"] == pytest.approx(r2["iou"])
