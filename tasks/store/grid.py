"""The pixel grid of one site: the common frame for every per-site raster."""

from __future__ import annotations

from dataclasses import dataclass

from affine import Affine


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
