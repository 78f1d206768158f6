"""Polygons -> rasters on the site grid.

Class-coded masks use 0 = background, 1..C = ``params.class_names``, C+1 = unclassed field (null label). A
pixel belongs to a polygon when its centre does (rasterio default, ``all_touched=False``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import shapely
from rasterio.features import rasterize
from shapely.geometry.base import BaseGeometry

from tasks.consensus.params import ConsensusParams
from tasks.consensus.site import SiteInput, grid_box
from tasks.store.grid import SiteGrid


def _shape(grid: SiteGrid) -> tuple[int, int]:
    return (int(grid.height), int(grid.width))


def footprint_mask(grid: SiteGrid, footprint: BaseGeometry | None) -> np.ndarray:
    """Pixels of the grid inside the site footprint (all pixels when the footprint is the grid box)."""
    shape = _shape(grid)
    if footprint is None or footprint.is_empty:
        return np.ones(shape, dtype=bool)
    box = grid_box(grid)
    if footprint.covers(box):
        return np.ones(shape, dtype=bool)
    return rasterize([(footprint, 1)], out_shape=shape, transform=grid.affine, fill=0, dtype="uint8") > 0


def rasterise_classes(grid: SiteGrid, polys: Sequence[tuple[BaseGeometry, int]]) -> np.ndarray:
    """uint8 class-coded mask; later shapes win where a labeller's own polygons overlap."""
    shapes = [(g, int(c)) for g, c in polys if g is not None and not g.is_empty]
    if not shapes:
        return np.zeros(_shape(grid), dtype=np.uint8)
    return rasterize(shapes, out_shape=_shape(grid), transform=grid.affine, fill=0, dtype="uint8")


def labeller_mask(site: SiteInput, labeller_id: str, params: ConsensusParams) -> np.ndarray:
    """Class-coded raster of one labeller on the site grid (cached on the SiteInput)."""
    key = ("mask", labeller_id, params.class_names)
    if key not in site._cache:
        polys = [(g, params.class_code(lbl)) for g, lbl in site.polygons(labeller_id)]
        site._cache[key] = rasterise_classes(site.grid, polys)
    return site._cache[key]


def site_footprint_mask(site: SiteInput) -> np.ndarray:
    if "footprint_mask" not in site._cache:
        site._cache["footprint_mask"] = footprint_mask(site.grid, site.footprint)
    return site._cache["footprint_mask"]


def boundary_raster(
    grid: SiteGrid, geoms: Sequence[BaseGeometry], footprint: BaseGeometry | None
) -> np.ndarray:
    """Pixels crossed by polygon boundaries, excluding edges that lie on the footprint outline.

    Clipping to the site creates artificial edges along the footprint; they are not field boundaries, so they
    are removed before burning (otherwise every clipped field would score boundary hits for free).
    """
    shape = _shape(grid)
    lines = [g.boundary for g in geoms if g is not None and not g.is_empty]
    if not lines:
        return np.zeros(shape, dtype=bool)
    edges = shapely.union_all(lines)
    if footprint is not None and not footprint.is_empty:
        eps = 1e-3 * grid.pixel_size
        edges = shapely.difference(edges, footprint.boundary.buffer(eps))
    if edges.is_empty:
        return np.zeros(shape, dtype=bool)
    return rasterize([(edges, 1)], out_shape=shape, transform=grid.affine, fill=0, dtype="uint8") > 0
