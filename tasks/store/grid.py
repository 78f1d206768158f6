"""The pixel grid of one site: the common frame for every per-site raster."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import pyproj
from affine import Affine


@lru_cache(maxsize=64)
def _transformer(src: pyproj.CRS, dst: pyproj.CRS) -> pyproj.Transformer:
    return pyproj.Transformer.from_crs(src, dst, always_xy=True)


def transformer(src, dst) -> pyproj.Transformer:
    """A cached x/y-order transformer between two CRSs (anything ``pyproj.CRS.from_user_input`` takes).

    Building one searches PROJ's database for the operation: ~15 ms when the source is a CRS read from
    GeoParquet metadata (PROJJSON without an EPSG code), paid once per site before this cache. Transformers
    are thread-safe since pyproj 3.1 (each thread gets its own PROJ object)."""
    return _transformer(pyproj.CRS.from_user_input(src), pyproj.CRS.from_user_input(dst))


@dataclass(frozen=True)
class SiteGrid:
    """A site's tile grid in its native (projected) CRS.

    ``transform`` is in rasterio's Affine order (a, b, c, d, e, f); masks, probabilities and risk rasters
    for the site are ``(height, width)`` arrays on this grid.
    """

    site_id: str
    crs: str
    transform: tuple[float, float, float, float, float, float]
    width: int
    height: int

    @property
    def affine(self) -> Affine:
        return Affine(*self.transform)

    @property
    def pixel_size(self) -> float:
        """Side of a pixel in CRS units (metres for projected CRSs)."""
        return float(abs(self.transform[0]))

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        a = self.affine
        x0, y0 = a * (0, 0)
        x1, y1 = a * (self.width, self.height)
        return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))

    @classmethod
    def from_row(cls, row) -> SiteGrid:
        """Build from a row of the ``sites`` table (mapping or namedtuple-like)."""
        get = row.__getitem__
        return cls(
            site_id=str(get("site_id")),
            crs=str(get("crs")),
            transform=tuple(float(v) for v in get("transform"))[:6],
            width=int(get("width")),
            height=int(get("height")),
        )
