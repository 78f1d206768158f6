"""Imagery → scenes (checked on open) and each site's window on the scene grids that cover it.

The pixels under those windows are read and summarised into the ``tiles`` table by ``tasks.ingest.tiles``:
rasterio windowed reads inside Dask tasks, one task per scene (or per run of its tiles), each sweeping its
scene in block-aligned strips, so every block is decoded once and nothing loads a whole scene (see
``tasks.ingest.pixels`` for why this path uses no Dask-chunked xarray).
"""

from __future__ import annotations

import glob
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
import shapely
from pyproj import CRS
from rasterio.errors import RasterioIOError
from rasterio.windows import Window, from_bounds
from shapely.geometry import box

from tasks.store.artifacts import file_hash
from tasks.store.errors import InputError

_NUMERIC = ("uint8", "uint16", "int16", "uint32", "int32", "float32", "float64")


@dataclass(frozen=True)
class Scene:
    scene_id: str
    path: str
    crs: str
    transform: tuple[float, ...]
    width: int
    height: int
    count: int
    dtype: str
    nodata: float | None
    band_names: tuple[str, ...]
    file_hash: str
    block_shape: tuple[int, int] = (1, 1)  # (rows, cols) of the file's first band's blocks

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return rasterio.transform.array_bounds(self.height, self.width, rasterio.Affine(*self.transform))[::1]


def find_scenes(pattern: str) -> list[str]:
    paths = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
    paths = [p for p in paths if Path(p).is_file()]
    if not paths:
        raise InputError(pattern, "no imagery file matches")
    return paths


def open_scene(
    path: str, band_names: list[str] | None, required_bands: int, hasher: Callable[[str], str] | None = None
) -> Scene:
    """Read a scene's header and check it is a layout the pipeline supports.

    ``hasher`` gives the file's content hash (default :func:`file_hash`, which reads the whole file; the
    stage passes a :class:`tasks.store.hash_cache.HashCache` so unchanged scenes are not reread).
    """
    try:
        with rasterio.open(path) as src:
            if src.crs is None:
                raise InputError(path, "no CRS: the raster declares no coordinate reference system")
            crs = CRS.from_user_input(src.crs)
            if not crs.is_projected:
                raise InputError(path, f"CRS {crs.to_string()} is not projected; reproject to e.g. UTM first")
            dtypes = set(src.dtypes)
            if len(dtypes) != 1 or src.dtypes[0] not in _NUMERIC:
                raise InputError(
                    path, f"unsupported band layout: dtypes {sorted(dtypes)} (need one numeric dtype)"
                )
            if src.count < required_bands:
                raise InputError(
                    path, f"unsupported band layout: {src.count} bands, need at least {required_bands}"
                )
            names = tuple(band_names or [d or f"b{i + 1}" for i, d in enumerate(src.descriptions)])
            if len(names) != src.count:
                raise InputError(path, f"{src.count} bands but {len(names)} band names in the catalog")
            header = Scene(
                scene_id=Path(path).stem,
                path=str(path),
                crs=crs.to_string(),
                transform=tuple(src.transform)[:6],
                width=src.width,
                height=src.height,
                count=src.count,
                dtype=src.dtypes[0],
                nodata=src.nodata,
                band_names=names,
                file_hash="",
                block_shape=tuple(src.block_shapes[0]),
            )
    except RasterioIOError as exc:
        raise InputError(path, f"not a readable GeoTIFF: {exc}") from None
    return Scene(**{**header.__dict__, "file_hash": (hasher or file_hash)(path)})


def site_windows(sites_4326: gpd.GeoDataFrame, scenes: list[Scene], path_for_errors: str) -> pd.DataFrame:
    """Every (site, scene) pair whose footprint overlaps the scene, with the site's pixel window there.

    Sites arrive in any CRS; each footprint is reprojected once per scene CRS and snapped to that
    scene's pixel grid (offsets and size rounded to whole pixels).
    """
    rows = []
    by_crs: dict[str, gpd.GeoSeries] = {}
    for scene in scenes:
        if scene.crs not in by_crs:
            by_crs[scene.crs] = sites_4326.geometry.to_crs(scene.crs)
        geoms = by_crs[scene.crs]
        sb = box(*scene.bounds)
        hits = geoms.index[geoms.intersects(sb).to_numpy()]
        affine = rasterio.Affine(*scene.transform)
        window = _window_of_bounds(affine)
        sa, sb, sc, sd, se, sf = tuple(affine)[:6]
        bounds = shapely.bounds(geoms.loc[hits].to_numpy()).tolist()
        site_ids = sites_4326.loc[hits, "site_id"].tolist()
        for idx, site_id, b in zip(hits, site_ids, bounds, strict=True):
            col_off, row_off, w, h = window(*b)
            col, row = round(col_off), round(row_off)
            width, height = round(w), round(h)
            if width < 1 or height < 1:
                continue
            inside = max(0, min(col + width, scene.width) - max(col, 0)) * max(
                0, min(row + height, scene.height) - max(row, 0)
            )
            # affine @ Affine.translation(col, row), term by term as affine computes it
            t = [
                sa * 1.0 + sb * 0.0,
                sa * 0.0 + sb * 1.0,
                sa * col + sb * row + sc,
                sd * 1.0 + se * 0.0,
                sd * 0.0 + se * 1.0,
                sd * col + se * row + sf,
            ]
            rows.append(
                {
                    "row": idx,
                    "site_id": site_id,
                    "scene_id": scene.scene_id,
                    "crs": scene.crs,
                    "col_off": col,
                    "row_off": row,
                    "width": width,
                    "height": height,
                    "transform": t,
                    "coverage": inside / (width * height),
                }
            )
    pairs = pd.DataFrame(rows)
    covered = set(pairs["site_id"]) if len(pairs) else set()
    for idx, sid in sites_4326["site_id"].items():
        if sid not in covered:
            raise InputError(path_for_errors, f"site {sid!r} lies outside every imagery scene", row=idx)
    return pairs


def _window_of_bounds(affine: rasterio.Affine) -> Callable[..., tuple[float, float, float, float]]:
    """``rasterio.windows.from_bounds`` for one transform, as (col_off, row_off, width, height): the same
    arithmetic (the inverse matrix times the four corners, one ``dot`` per window) without building a
    transformer per call, which cost ~0.2 ms a window (most of ingest's scan of a 10x region)."""
    inverse = np.array(tuple(~affine), dtype=float).reshape(3, 3)

    def window(left, bottom, right, top):
        if (right - left) / affine.a < 0 or (bottom - top) / affine.e < 0:
            w = from_bounds(left, bottom, right, top, transform=affine)  # raises rasterio's WindowError
            return w.col_off, w.row_off, w.width, w.height
        m = np.empty((3, 4))
        m[0] = (left, right, right, left)
        m[1] = (top, top, bottom, bottom)
        m[2] = 1
        inverse.dot(m, out=m)
        cols, rows = m[0], m[1]
        col_start, col_stop = min(cols), max(cols)
        row_start, row_stop = min(rows), max(rows)
        return col_start, row_start, max(col_stop - col_start, 0.0), max(row_stop - row_start, 0.0)

    return window


def window_of(pair) -> Window:
    return Window(pair.col_off, pair.row_off, pair.width, pair.height)
