"""Per-site raster artifacts: one tiled, compressed float32 GeoTIFF with overviews on the site's grid."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling

from tasks.store.artifacts import unshare
from tasks.store.grid import SiteGrid


def write_site_raster(path: str | Path, grid: SiteGrid, bands: np.ndarray, names: Sequence[str]) -> None:
    """Write ``bands`` (count, height, width) on ``grid``; NaN is nodata (outside footprint / no input)."""
    bands = np.asarray(bands, dtype=np.float32)
    profile = {
        "driver": "GTiff",
        "width": grid.width,
        "height": grid.height,
        "count": bands.shape[0],
        "dtype": "float32",
        "crs": grid.crs,
        "transform": grid.affine,
        "nodata": float("nan"),
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
        "predictor": 3,
    }
    with rasterio.open(unshare(path), "w", **profile) as dst:
        dst.write(bands)
        dst.descriptions = tuple(names)
        dst.build_overviews([2, 4], Resampling.average)
