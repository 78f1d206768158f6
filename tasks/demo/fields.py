"""Ground truth on the ground: field parcels and land-cover objects of one site's cell.

Everything is built in UTM metres as shapely geometries; ``scenes.py`` rasterises them. Each site owns its
cell (the site square plus half the gap around it), so neighbouring sites never draw over each other and
fields can run past the site edge, where the truth is clipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import shapely
from shapely.geometry import MultiPoint, Point, Polygon, box

from tasks.demo.layout import PIXEL_M, SiteBox

HA = 10_000.0
MIN_FIELD_HA, MAX_FIELD_HA = 0.3, 6.0
MIN_CLIPPED_M2 = 200.0  # slivers of a field barely entering the site are not kept as truth


@dataclass
class SiteGround:
    """What lies on one site's cell: fields plus other painted objects (kind names ``scenes.SIGNATURES``)."""

    fields: list[tuple[Polygon, str]] = field(default_factory=list)  # full (unclipped) fields
    objects: list[tuple[object, str]] = field(default_factory=list)  # (geometry, kind) painted under fields
    top: list[tuple[object, str]] = field(default_factory=list)  # painted over fields (boundary lines)


def _half_plane(c: Point, angle: float, reach: float) -> Polygon:
    """A big square on one side of the line through ``c`` at ``angle``."""
    d = np.array([np.cos(angle), np.sin(angle)])
    n = np.array([-d[1], d[0]])
    o = np.array([c.x, c.y])
    pts = [o - d * reach, o + d * reach, o + d * reach + n * reach * 2, o - d * reach + n * reach * 2]
    return Polygon(pts)


def _partition(cell: Polygon, spacing: float, rng: np.random.Generator) -> list[Polygon]:
    """Voronoi cells of a jittered grid: convex, irregular parcels of roughly ``spacing``^2."""
    x0, y0, x1, y1 = cell.bounds
    xs = np.arange(x0 - spacing / 2, x1 + spacing, spacing)
    ys = np.arange(y0 - spacing / 2, y1 + spacing, spacing)
    gx, gy = np.meshgrid(xs, ys)
    pts = np.column_stack([gx.ravel(), gy.ravel()]) + rng.uniform(-0.4, 0.4, (gx.size, 2)) * spacing
    cells = shapely.get_parts(shapely.voronoi_polygons(MultiPoint(pts), extend_to=cell.buffer(spacing)))
    cells = shapely.intersection(cells, cell)
    out: list[Polygon] = []
    for c in cells:
        if c.is_empty or c.geom_type != "Polygon":
            continue
        if c.area > 1.2 * HA and rng.random() < 0.25:  # split into two fields sharing an edge
            half = _half_plane(c.centroid, rng.uniform(0, np.pi), 4 * spacing)
            out.extend(p for p in (c.intersection(half), c.difference(half)) if p.geom_type == "Polygon")
        else:
            out.append(c)
    return out


def _cropland(cell: Polygon, rng: np.random.Generator, g: SiteGround) -> None:
    spacing = rng.uniform(26, 56) * PIXEL_M
    inset_share = rng.uniform(0.2, 0.7)
    lines = rng.random() < 0.5
    for parcel in _partition(cell, spacing, rng):
        a = parcel.area
        if not (MIN_FIELD_HA * HA <= a <= MAX_FIELD_HA * HA) or rng.random() > 0.8:
            continue  # stays natural background
        if rng.random() < inset_share:  # a hedge / path separates it from its neighbours
            parcel = parcel.buffer(-rng.uniform(3, 9), join_style="mitre")
            if parcel.is_empty or parcel.geom_type != "Polygon" or parcel.area < MIN_FIELD_HA * HA:
                continue
        elif lines:
            g.top.append((shapely.LineString(parcel.exterior.coords), "boundary"))
        parcel = shapely.set_precision(parcel, 0.01)
        g.fields.append((parcel, "crop" if rng.random() < 0.6 else "fallow"))


def _blobs(cell: Polygon, rng: np.random.Generator, n: int, r_lo: float, r_hi: float) -> list:
    x0, y0, x1, y1 = cell.bounds
    xy = rng.uniform([x0, y0], [x1, y1], (n, 2))
    r = rng.uniform(r_lo, r_hi, n)
    return list(shapely.intersection(shapely.buffer(shapely.points(xy), r, quad_segs=6), cell))


def _cover(cell: Polygon, rng: np.random.Generator) -> list:
    """Most of the cell, with a ragged outline so the site square does not show in the image."""
    core = cell.buffer(-rng.uniform(40, 120))
    return [core, *_blobs(cell, rng, 14, 120, 260)]


def _settlement(cell: Polygon, rng: np.random.Generator, g: SiteGround) -> None:
    x0, y0, x1, y1 = cell.bounds
    g.objects.append((cell, "settlement"))
    for _ in range(int(rng.integers(2, 4))):  # a few roads
        if rng.random() < 0.5:
            y = rng.uniform(y0, y1)
            line = shapely.LineString([(x0, y), (x1, y + rng.uniform(-80, 80))])
        else:
            x = rng.uniform(x0, x1)
            line = shapely.LineString([(x, y0), (x + rng.uniform(-80, 80), y1)])
        g.objects.append((line.buffer(rng.uniform(3, 6)).intersection(cell), "road"))
    n = int(rng.integers(150, 350))
    xy = rng.uniform([x0, y0], [x1, y1], (n, 2))
    wh = rng.uniform(8, 26, (n, 2))
    roofs = shapely.box(xy[:, 0], xy[:, 1], xy[:, 0] + wh[:, 0], xy[:, 1] + wh[:, 1])
    for r in shapely.intersection(roofs, cell):
        g.objects.append((r, "roof" if rng.random() < 0.6 else "roof_dark"))
    for t in _blobs(cell, rng, int(rng.integers(5, 20)), 4, 10):
        g.objects.append((t, "shrub"))


def _water(cell: Polygon, rng: np.random.Generator, g: SiteGround) -> None:
    x0, y0, x1, y1 = cell.bounds
    w = x1 - x0
    c = rng.uniform([x0 + 0.2 * w, y0 + 0.2 * w], [x1 - 0.2 * w, y1 - 0.2 * w])
    ang = np.sort(rng.uniform(0, 2 * np.pi, 9))
    rad = rng.uniform(0.25, 0.6, 9) * w
    lake = Polygon(np.column_stack([c[0] + rad * np.cos(ang), c[1] + rad * np.sin(ang)]))
    lake = shapely.make_valid(lake).buffer(0.08 * w).simplify(4).intersection(cell)
    g.objects.append((lake.buffer(rng.uniform(8, 20)).intersection(cell), "grass"))  # green shore
    g.objects.append((lake, "water"))


def site_ground(site: SiteBox, land_cover: str, rng: np.random.Generator) -> SiteGround:
    """Objects and fields of one site cell, depending on its land cover."""
    cell = box(*site.cell_bounds)
    g = SiteGround()
    if land_cover == "cropland":
        _cropland(cell, rng, g)
    elif land_cover == "grassland":
        g.objects.extend((b, "grass") for b in _cover(cell, rng))
        g.objects.extend((b, "shrub") for b in _blobs(cell, rng, int(rng.integers(3, 12)), 8, 30))
    elif land_cover == "shrubland":
        g.objects.extend((b, "shrub") for b in _cover(cell, rng))
        g.objects.extend((b, "grass") for b in _blobs(cell, rng, int(rng.integers(3, 10)), 10, 40))
        g.objects.extend((b, "bare") for b in _blobs(cell, rng, int(rng.integers(2, 6)), 6, 20))
    elif land_cover == "settlement":
        _settlement(cell, rng, g)
    elif land_cover == "water":
        _water(cell, rng, g)
    else:
        raise ValueError(land_cover)
    return g


def truth_fields(site: SiteBox, ground: SiteGround) -> list[tuple[Polygon, str]]:
    """True fields clipped to the site square (largest part if clipping splits one)."""
    sq = box(*site.bounds)
    out = []
    for geom, label in ground.fields:
        clipped = shapely.intersection(geom, sq)
        parts = [p for p in shapely.get_parts(clipped) if p.geom_type == "Polygon"]
        if not parts:
            continue
        part = max(parts, key=lambda p: p.area)
        if part.area >= MIN_CLIPPED_M2:
            out.append((part, label))
    return out
