"""Imagery → site grids and the ``tiles`` table.

Scenes are opened lazily as Dask-chunked xarray (rioxarray); each site tile is a slice of that array,
so a batch's graph reads every COG block it needs once and nothing loads a whole scene.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import dask
import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
import rioxarray
from pyproj import CRS
from rasterio.errors import RasterioIOError
from rasterio.windows import Window, from_bounds
from shapely.geometry import box

from tasks.store.artifacts import bytes_hash, file_hash
from tasks.store.errors import InputError

_NUMERIC = ("uint8", "uint16", "int16", "uint32", "int32", "float32", "float64")
PERCENTILES = (2, 50, 98)


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

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return rasterio.transform.array_bounds(self.height, self.width, rasterio.Affine(*self.transform))[::1]


def find_scenes(pattern: str) -> list[str]:
    paths = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
    paths = [p for p in paths if Path(p).is_file()]
    if not paths:
        raise InputError(pattern, "no imagery file matches")
    return paths


def open_scene(path: str, band_names: list[str] | None, required_bands: int) -> Scene:
    """Read a scene's header and check it is a layout the pipeline supports."""
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
            )
    except RasterioIOError as exc:
        raise InputError(path, f"not a readable GeoTIFF: {exc}") from None
    return Scene(**{**header.__dict__, "file_hash": file_hash(path)})


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
        for idx in hits:
            g = geoms.loc[idx]
            w = from_bounds(*g.bounds, transform=affine)
            col, row = round(w.col_off), round(w.row_off)
            width, height = round(w.width), round(w.height)
            if width < 1 or height < 1:
                continue
            inside = max(0, min(col + width, scene.width) - max(col, 0)) * max(
                0, min(row + height, scene.height) - max(row, 0)
            )
            t = affine * rasterio.Affine.translation(col, row)
            rows.append(
                {
                    "row": idx,
                    "site_id": sites_4326.at[idx, "site_id"],
                    "scene_id": scene.scene_id,
                    "crs": scene.crs,
                    "col_off": col,
                    "row_off": row,
                    "width": width,
                    "height": height,
                    "transform": list(tuple(t)[:6]),
                    "coverage": inside / (width * height),
                }
            )
    pairs = pd.DataFrame(rows)
    covered = set(pairs["site_id"]) if len(pairs) else set()
    for idx, sid in sites_4326["site_id"].items():
        if sid not in covered:
            raise InputError(path_for_errors, f"site {sid!r} lies outside every imagery scene", row=idx)
    return pairs


VISIBLE = {"b", "g", "r", "blue", "green", "red", "b02", "b03", "b04"}


def visible_bands(names) -> list[int]:
    """Indices of the visible bands, by name; scenes without named B/G/R bands get no cloud screening."""
    return [i for i, n in enumerate(names) if str(n).lower() in VISIBLE]


def _stats(arr: np.ndarray, nodata: float | None, vis_idx: list[int], cloud_dn: float) -> dict:
    """Band statistics of one tile (bands, y, x); the tile may be padded with nodata outside the scene."""
    bands = arr.shape[0]
    if nodata is None:
        data_mask = np.ones(arr.shape[1:], bool)
    elif np.isnan(nodata):
        data_mask = ~np.isnan(arr).any(axis=0)
    else:
        data_mask = ~(arr == nodata).any(axis=0)
    if vis_idx:
        cloud = data_mask & (arr[vis_idx].astype(np.float32).mean(axis=0) > cloud_dn)
    else:
        cloud = np.zeros_like(data_mask)
    valid = data_mask & ~cloud
    n = arr.shape[1] * arr.shape[2]
    n_data = int(data_mask.sum())
    out = {
        "nodata_fraction": 1.0 - n_data / n,
        "cloud_fraction": float(cloud.sum() / n_data) if n_data else 0.0,
        "valid_fraction": float(valid.sum() / n),
        "content_hash": bytes_hash(np.ascontiguousarray(arr).tobytes(), str(arr.shape).encode()),
    }
    if valid.any():
        px = arr[:, valid].astype(np.float64)
        q = np.percentile(px, PERCENTILES, axis=1)
        out.update(mean=px.mean(axis=1).tolist(), std=px.std(axis=1).tolist())
        out.update({f"p{p:02d}": q[i].tolist() for i, p in enumerate(PERCENTILES)})
    else:
        nan = [float("nan")] * bands
        out.update(mean=nan, std=nan, **{f"p{p:02d}": nan for p in PERCENTILES})
    return out


def _padded(tile: np.ndarray, pad: tuple, fill: float) -> np.ndarray:
    if any(any(p) for p in pad):
        return np.pad(tile, ((0, 0), *pad), constant_values=fill)
    return tile


def cloud_dn(dtype: str, threshold: float | None) -> float:
    """DN above which the visible-band mean counts as cloud: explicit, or a default per dtype."""
    if threshold is not None:
        return float(threshold)
    return 220.0 if dtype == "uint8" else 0.45 if dtype.startswith("float") else 4500.0


def tile_stats(pairs: pd.DataFrame, scenes: dict[str, Scene], cloud_threshold: float | None) -> pd.DataFrame:
    """Statistics of every (site, scene) tile in ``pairs``; runs on the active Dask scheduler."""
    results = []
    arrays = {}
    for p in pairs.itertuples(index=False):
        sc = scenes[p.scene_id]
        if sc.scene_id not in arrays:
            arrays[sc.scene_id] = rioxarray.open_rasterio(
                sc.path, chunks={"band": -1, "y": 1024, "x": 1024}, lock=False, cache=False, masked=False
            )
        da = arrays[sc.scene_id]
        r0, c0 = max(p.row_off, 0), max(p.col_off, 0)
        r1, c1 = min(p.row_off + p.height, sc.height), min(p.col_off + p.width, sc.width)
        pad = ((r0 - p.row_off, p.row_off + p.height - r1), (c0 - p.col_off, p.col_off + p.width - c1))
        fill = sc.nodata if sc.nodata is not None else 0
        tile = dask.delayed(_padded)(da.data[:, r0:r1, c0:c1], pad, fill)
        vis = visible_bands(sc.band_names)
        results.append(dask.delayed(_stats)(tile, sc.nodata, vis, cloud_dn(sc.dtype, cloud_threshold)))
    try:
        stats = dask.compute(*results)
    except RasterioIOError as exc:
        raise InputError(
            ", ".join(sorted({scenes[s].path for s in pairs.scene_id})), f"corrupt imagery: {exc}"
        ) from None
    except Exception as exc:
        # A truncated file surfaces as a GDAL read error deep in the graph; name the scenes involved.
        if "rasterio" in type(exc).__module__ or "TIFF" in str(exc) or "Read" in str(exc):
            paths = sorted({scenes[s].path for s in pairs.scene_id})
            raise InputError(", ".join(paths), f"corrupt or truncated imagery: {exc}") from None
        raise
    out = pairs[["site_id", "scene_id", "crs", "transform", "width", "height"]].reset_index(drop=True).copy()
    out["band_names"] = [list(scenes[s].band_names) for s in out.scene_id]
    stats_df = pd.DataFrame(list(stats))
    return pd.concat([out, stats_df], axis=1)


def window_of(pair) -> Window:
    return Window(pair.col_off, pair.row_off, pair.width, pair.height)
