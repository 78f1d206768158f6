"""Simulated labellers: each turns the true fields of a site into the polygons a person would have drawn.

Every behaviour is parameterised here and written to ``truth/labellers.json`` so downstream quality scores
can be checked against what was actually simulated.
"""

from __future__ import annotations

import numpy as np
import shapely
from shapely.geometry import Polygon, box

from tasks.demo.layout import PIXEL_M

EXPERT = "expert"
CROWD = ("precise", "sloppy_edges", "misses_small", "merger", "shifted", "spammer", "drifter")
LAND_COVERS = ("cropland", "grassland", "shrubland", "settlement", "water")
HIDDEN_SKIP = 0.3  # people do not draw a field when less than this share of it is visible

_BASE = {
    "jitter_px": 0.3,
    "simplify_px": 0.0,
    "segment_px": 0.0,
    "min_area_ha": 0.0,
    "miss_rate": 0.0,
    "merge_gap_m": 0.0,
    "merge_prob": 0.0,
    "shift_m": [0.0, 0.0],
    "class_flip_rate": 0.0,
    "keeps_invalid": False,
    "random_rectangles": False,
}

SPECS: dict[str, dict] = {
    EXPERT: {
        "behaviour": "reference",
        "description": "Reference expert: vertices within ~0.25 px, correct classes; defines gold sites.",
        "params": {"jitter_px": 0.2},
        "confusion": (0.0, 0.02),
    },
    "precise": {
        "behaviour": "precise",
        "description": "Careful: ~0.5 px vertex noise, rare crop/fallow mix-ups.",
        "params": {"jitter_px": 0.5, "class_flip_rate": 0.03},
        "confusion": (0.02, 0.08),
    },
    "sloppy_edges": {
        "behaviour": "sloppy_edges",
        "description": "Rough outlines: simplified (1.5 px) then vertex jitter ~2 px on edges densified "
        "every 10 px; may leave self-intersecting rings.",
        "params": {
            "jitter_px": 2.0,
            "simplify_px": 1.5,
            "segment_px": 10.0,
            "class_flip_rate": 0.08,
            "keeps_invalid": True,
        },
        "confusion": (0.05, 0.15),
    },
    "misses_small": {
        "behaviour": "misses_small",
        "description": "Accurate outlines but skips every field smaller than 1 ha (area inside the site).",
        "params": {"jitter_px": 0.5, "min_area_ha": 1.0, "class_flip_rate": 0.04},
        "confusion": (0.03, 0.10),
    },
    "merger": {
        "behaviour": "merger",
        "description": "Draws one outline around neighbouring fields that touch or lie within 10 m (each "
        "such neighbour pair merged with probability 0.3, so outlines span ~2-5 fields); the merged "
        "polygon takes the class of its largest field.",
        "params": {"jitter_px": 0.7, "merge_gap_m": 10.0, "merge_prob": 0.3, "class_flip_rate": 0.05},
        "confusion": (0.03, 0.10),
    },
    "shifted": {
        "behaviour": "shifted",
        "description": "Mis-registered basemap: every polygon translated by 3 px (12 m) towards the "
        "south-east (+9.6 m east, -7.2 m north), then clipped to the site.",
        "params": {"jitter_px": 0.4, "shift_m": [9.6, -7.2], "class_flip_rate": 0.03},
        "confusion": (0.02, 0.08),
    },
    "spammer": {
        "behaviour": "spammer",
        "description": "Random rotated rectangles (1-6 per site, 0.2-4 ha) unrelated to the image, random "
        "classes; uniform random land cover.",
        "params": {"random_rectangles": True, "class_flip_rate": 0.5},
        "confusion": None,
    },
    "drifter": {
        "behaviour": "drifter",
        "description": "Precise for its first 25% of assignments (own time order), then linearly worse: "
        "jitter 0.5->3.5 px, simplification 0->3 px, missed fields 0->50%, class flips 3%->25%.",
        "params": {
            "jitter_px": 0.5,
            "keeps_invalid": True,
            "class_flip_rate": 0.03,
            "drift_start": 0.25,
            "drift_jitter_px": 3.0,
            "drift_simplify_px": 3.0,
            "drift_miss_rate": 0.5,
            "drift_flip_rate": 0.22,
        },
        "confusion": (0.06, 0.12),
    },
}


def params(labeller_id: str) -> dict:
    return {**_BASE, **SPECS[labeller_id]["params"]}


def confusion_matrix(labeller_id: str) -> np.ndarray:
    """Row = true land cover, column = reported, in LAND_COVERS order.

    ``(err, gs)``: ``gs`` of grassland/shrubland goes to the other of the pair; ``err`` is spread evenly
    over the four wrong classes. The spammer answers uniformly at random.
    """
    n = len(LAND_COVERS)
    conf = SPECS[labeller_id]["confusion"]
    if conf is None:
        return np.full((n, n), 1.0 / n)
    err, gs = conf
    m = np.full((n, n), err / (n - 1))
    np.fill_diagonal(m, 1.0 - err)
    g, s = LAND_COVERS.index("grassland"), LAND_COVERS.index("shrubland")
    m[g, g] -= gs
    m[g, s] += gs
    m[s, s] -= gs
    m[s, g] += gs
    return m


def labellers_json() -> dict:
    out = {}
    for lab, spec in SPECS.items():
        p = params(lab)
        p["item_confusion"] = {
            "classes": list(LAND_COVERS),
            "matrix": confusion_matrix(lab).round(4).tolist(),
        }
        p["hidden_skip_below_visible_fraction"] = None if p["random_rectangles"] else HIDDEN_SKIP
        out[lab] = {"behaviour": spec["behaviour"], "description": spec["description"], "params": p}
    return out


def item_label(labeller_id: str, land_cover: str, rng: np.random.Generator) -> str:
    row = confusion_matrix(labeller_id)[LAND_COVERS.index(land_cover)]
    return LAND_COVERS[int(rng.choice(len(LAND_COVERS), p=row))]


def _effective(labeller_id: str, time_rank: float) -> dict:
    """Parameters at a point of the labeller's timeline (only the drifter changes)."""
    p = params(labeller_id)
    if "drift_start" in p:
        d = float(np.clip((time_rank - p["drift_start"]) / (1.0 - p["drift_start"]), 0.0, 1.0))
        p["jitter_px"] += d * p["drift_jitter_px"]
        p["simplify_px"] += d * p["drift_simplify_px"]
        p["miss_rate"] += d * p["drift_miss_rate"]
        p["class_flip_rate"] += d * p["drift_flip_rate"]
        p["segment_px"] = 10.0 if d > 0 else 0.0
    return p


def _jitter(poly: Polygon, sigma_m: float, bounds, rng: np.random.Generator) -> Polygon:
    """Independent Gaussian noise on each vertex, clamped to the site so it never leaves the square."""

    def ring(coords) -> np.ndarray:
        c = np.asarray(coords)[:-1]
        c = c + rng.normal(0.0, sigma_m, size=c.shape)
        c[:, 0] = np.clip(c[:, 0], bounds[0], bounds[2])
        c[:, 1] = np.clip(c[:, 1], bounds[1], bounds[3])
        return np.vstack([c, c[:1]])

    return Polygon(ring(poly.exterior.coords), [ring(r.coords) for r in poly.interiors])


def _polygons(geom) -> list[Polygon]:
    return [g for g in shapely.get_parts(geom) if isinstance(g, Polygon) and not g.is_empty and g.area > 0]


def _merge(
    geoms: list[Polygon], labels: list[str], gap_m: float, prob: float, rng: np.random.Generator
) -> tuple[list, list[str]]:
    """Union neighbours closer than ``gap_m``: each neighbour pair is merged with probability ``prob``.

    ``prob`` stays below the bond-percolation threshold of a field mosaic (~0.35) so merged outlines
    cover a few fields, not the whole site. A merged outline keeps the class of its largest member.
    """
    arr = np.array(geoms, dtype=object)
    left, right = shapely.STRtree(arr).query(arr, predicate="dwithin", distance=gap_m)
    pairs = [(int(a), int(b)) for a, b in zip(left, right, strict=True) if a < b]
    keep = rng.random(len(pairs)) < prob
    parent = list(range(len(geoms)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for (a, b), k in zip(pairs, keep, strict=True):
        if k:
            parent[find(a)] = find(b)
    groups: dict[int, list[int]] = {}
    for i in range(len(geoms)):
        groups.setdefault(find(i), []).append(i)
    half = gap_m / 2
    areas = np.array([g.area for g in geoms])
    out_g, out_l = [], []
    for members in groups.values():
        if len(members) == 1:
            merged = geoms[members[0]]
        else:
            grown = shapely.union_all(shapely.buffer(arr[members], half, join_style="mitre"))
            merged = shapely.buffer(grown, -half, join_style="mitre")
        if not merged.is_empty:
            out_g.append(merged)
            out_l.append(labels[members[int(np.argmax(areas[members]))]])
    return out_g, out_l


def _spam(bounds, rng: np.random.Generator) -> tuple[list, list[str]]:
    x0, y0, x1, y1 = bounds
    geoms, labels = [], []
    for _ in range(int(rng.integers(1, 7))):
        area = rng.uniform(2_000, 40_000)
        aspect = rng.uniform(0.5, 2.0)
        w, h = np.sqrt(area * aspect), np.sqrt(area / aspect)
        cx, cy = rng.uniform(x0, x1), rng.uniform(y0, y1)
        rect = shapely.affinity.rotate(
            box(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), rng.uniform(0, 90)
        )
        geoms.append(rect)
        labels.append("crop" if rng.random() < 0.5 else "fallow")
    return geoms, labels


def draw(
    labeller_id: str,
    fields: list[tuple[Polygon, str, float]],
    bounds: tuple[float, float, float, float],
    time_rank: float,
    rng: np.random.Generator,
) -> list[tuple[Polygon, str]]:
    """Polygons (clipped to the site square) drawn for ``fields`` = [(geometry, label, visible share)]."""
    p = _effective(labeller_id, time_rank)
    if p["random_rectangles"]:
        geoms, labels = _spam(bounds, rng)
    else:
        keep = [
            (g, lab)
            for g, lab, vis in fields
            if vis >= HIDDEN_SKIP and g.area >= p["min_area_ha"] * 10_000 and rng.random() >= p["miss_rate"]
        ]
        geoms = [g for g, _ in keep]
        labels = [lab for _, lab in keep]
        if geoms and p["merge_gap_m"] > 0:
            geoms, labels = _merge(geoms, labels, p["merge_gap_m"], p["merge_prob"], rng)
    site = box(*bounds)
    out: list[tuple[Polygon, str]] = []
    for g, lab in zip(geoms, labels, strict=True):
        dx, dy = p["shift_m"]
        if dx or dy:
            g = shapely.affinity.translate(g, dx, dy)
        if p["simplify_px"] > 0:
            g = shapely.simplify(g, p["simplify_px"] * PIXEL_M, preserve_topology=True)
        if rng.random() < p["class_flip_rate"]:
            lab = "fallow" if lab == "crop" else "crop"
        for part in _polygons(shapely.intersection(g, site)):
            if p["segment_px"] > 0:
                part = shapely.segmentize(part, p["segment_px"] * PIXEL_M)
            j = _jitter(part, p["jitter_px"] * PIXEL_M, bounds, rng)
            if j.is_valid or p["keeps_invalid"]:
                if j.area > 0:
                    out.append((j, lab))
            else:
                out.extend((q, lab) for q in _polygons(shapely.make_valid(j)))
    return out
