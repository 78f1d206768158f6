"""Imagery → site grids and the ``tiles`` table.

Scenes are opened lazily as Dask-chunked xarray (rioxarray); each site tile is a slice of that array,
so a batch's graph reads every COG block it needs once and nothing loads a whole scene.
"""

from __future__ import annotations

import glob
from collections.abc import Callable
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
from tasks.store.reuse import code_key, content_key

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


# np.percentile divides the percentiles by 100 before its 'linear' recipe; _hist_summary repeats the recipe.
_Q = np.true_divide(np.asarray(PERCENTILES), 100)
# Integer dtypes summarised from exact per-band histograms, with the offset that makes their values >= 0.
_HIST_OFFSET = {"uint8": 0, "uint16": 0, "int8": 128, "int16": 32768}


def _lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """numpy's quantile interpolation (``numpy.lib._function_base_impl._lerp``), operation for operation."""
    diff = b - a
    return np.where(t >= 0.5, b - diff * (1 - t), a + diff * t)


def _hist_summary(flat: np.ndarray, keep: np.ndarray, n_keep: int, offset: int) -> tuple:
    """Mean, std and PERCENTILES of every band of ``flat[:, keep]`` (integer pixels, bands x n).

    From one exact histogram per band instead of a float64 copy and a partition. The mean is the same
    correctly rounded quotient as numpy's; the std is the correctly rounded population std (numpy's
    differs from it by summation round-off, ~1e-16 relative); the percentiles are np.percentile's default
    'linear' method to the bit: same virtual indexes, same order statistics, same interpolation.
    """
    bands, n = flat.shape
    if offset:
        flat = flat.astype(np.int32) + offset
    size = int(flat.max()) + 1
    hist = np.empty((bands, size), np.int64)
    if n_keep == n:
        for b in range(bands):
            hist[b] = np.bincount(flat[b], minlength=size)
    elif 2 * n_keep >= n:  # few pixels dropped: histogram everything, subtract the dropped ones
        drop = flat.compress(~keep, axis=1)
        for b in range(bands):
            hist[b] = np.bincount(flat[b], minlength=size) - np.bincount(drop[b], minlength=size)
    else:
        kept = flat.compress(keep, axis=1)
        for b in range(bands):
            hist[b] = np.bincount(kept[b], minlength=size)
    v = np.arange(size, dtype=np.int64)
    s1, s2 = (hist @ v).tolist(), (hist @ (v * v)).tolist()  # exact: n_keep < 2**31 (caller)
    m = n_keep
    mean = [(s - offset * m) / m for s in s1]  # Python int / int: correctly rounded
    std = [float(np.sqrt((m * q - s * s) / (m * m))) for s, q in zip(s1, s2, strict=True)]
    vi = (m - 1) * _Q
    prev = np.floor(vi)
    above = vi >= m - 1
    ks = np.concatenate([np.where(above, m - 1, prev), np.where(above, m - 1, prev + 1)]).astype(np.int64)
    gamma = vi - np.where(above, -1, prev)
    cum = np.cumsum(hist, axis=1)
    order = np.array([np.searchsorted(cum[b], ks, side="right") for b in range(bands)], np.float64) - offset
    k = len(gamma)
    return mean, std, _lerp(order[:, :k].T, order[:, k:].T, gamma[:, None])


def _stats(
    arr: np.ndarray, nodata: float | None, vis_idx: list[int], cloud_dn: float, pad=((0, 0), (0, 0))
) -> dict:
    """Band statistics of one tile (bands, y, x); ``pad`` rows/columns lie outside the scene (no data)."""
    arr = np.ascontiguousarray(arr)
    bands = arr.shape[0]
    if nodata is None:
        data_mask = np.ones(arr.shape[1:], bool)
    elif np.isnan(nodata):
        data_mask = ~np.isnan(arr).any(axis=0)
    else:
        data_mask = ~(arr == nodata).any(axis=0)
    (top, bottom), (left, right) = pad
    if top or bottom or left or right:  # the fill is not nodata when the scene declares no nodata value
        inside = np.zeros_like(data_mask)
        inside[top : arr.shape[1] - bottom, left : arr.shape[2] - right] = True
        data_mask &= inside
    if vis_idx:  # == arr[vis_idx].astype(np.float32).mean(axis=0), without the float32 copy
        vis_mean = np.add.reduce(arr[vis_idx], axis=0, dtype=np.float32) / np.float32(len(vis_idx))
        cloud = data_mask & (vis_mean > cloud_dn)
    else:
        cloud = np.zeros_like(data_mask)
    valid = data_mask & ~cloud
    n = arr.shape[1] * arr.shape[2]
    n_data = int(data_mask.sum())
    out = {
        "nodata_fraction": 1.0 - n_data / n,
        "cloud_fraction": float(cloud.sum() / n_data) if n_data else 0.0,
        "valid_fraction": float(valid.sum() / n),
        "content_hash": bytes_hash(arr.reshape(-1).view(np.uint8), str(arr.shape).encode()),
    }
    n_valid = int(np.count_nonzero(valid))
    if n_valid:
        flat, keep = arr.reshape(bands, -1), valid.reshape(-1)
        offset = _HIST_OFFSET.get(arr.dtype.name)
        if offset is not None and n_valid < 2**31:
            mean, std, q = _hist_summary(flat, keep, n_valid, offset)
        else:
            px = arr[:, valid].astype(np.float64)
            q = np.percentile(px, PERCENTILES, axis=1)
            mean, std = px.mean(axis=1).tolist(), px.std(axis=1).tolist()
        out.update(mean=mean, std=std)
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


# A scene's Dask chunks: whole COG blocks, about this many rows x cols, all bands in one chunk.
_CHUNK_ROWS = 256
_CHUNK_COLS = 2048


def _whole_blocks(target: int, block: int, size: int) -> int:
    """``target`` rounded up to whole blocks, at most the scene size."""
    return min(max(block, -(-target // block) * block), size)


def _tile_from_chunks(chunks: list[list[np.ndarray]], row_edges, col_edges, r0, r1, c0, c1) -> np.ndarray:
    """Rows r0:r1, cols c0:c1 of the mosaic of ``chunks`` (a view when one chunk holds them)."""
    first = chunks[0][0]
    if r1 <= r0 or c1 <= c0:  # as an empty slice of the scene array
        return np.empty((first.shape[0], max(r1 - r0, 0), max(c1 - c0, 0)), first.dtype)
    i0, i1 = np.searchsorted(row_edges, [r0, r1 - 1], side="right") - 1
    j0, j1 = np.searchsorted(col_edges, [c0, c1 - 1], side="right") - 1
    rows = []
    for i in range(i0, i1 + 1):
        ys = slice(max(r0, row_edges[i]) - row_edges[i], min(r1, row_edges[i + 1]) - row_edges[i])
        parts = []
        for j in range(j0, j1 + 1):
            xs = slice(max(c0, col_edges[j]) - col_edges[j], min(c1, col_edges[j + 1]) - col_edges[j])
            parts.append(chunks[i][j][:, ys, xs])
        rows.append(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=2))
    return rows[0] if len(rows) == 1 else np.concatenate(rows, axis=1)


def _group_stats(chunks, row_edges, col_edges, tiles, nodata, vis_idx, dn) -> list[dict]:
    """Statistics of the tiles cut from a few neighbouring chunks: one Dask task per group of tiles."""
    return [
        _stats(
            _padded(_tile_from_chunks(chunks, row_edges, col_edges, *win), pad, fill),
            nodata,
            vis_idx,
            dn,
            pad,
        )
        for win, pad, fill in tiles
    ]


# The columns ``tile_stats`` computes from pixels (in its order); the rest of a row comes from ``pairs``.
STAT_COLUMNS = (
    "nodata_fraction",
    "cloud_fraction",
    "valid_fraction",
    "content_hash",
    "mean",
    "std",
    *(f"p{p:02d}" for p in PERCENTILES),
)
TILE_COLUMNS = ("site_id", "scene_id", "crs", "transform", "width", "height", "band_names", *STAT_COLUMNS)


def tile_unit(site_id: str, scene_id: str) -> str:
    """The reuse unit id of a tile."""
    return f"{site_id}/{scene_id}"


def tile_keys(pairs: pd.DataFrame, scenes: dict[str, Scene], cloud_threshold: float | None) -> dict[str, str]:
    """Per tile (``tile_unit``): the content key of exactly what its ``tile_stats`` row depends on.

    The pixels are the scene file's bytes (its hash: data, nodata value, dtype and size, which decide the
    padding) inside the window; the band names decide which bands screen clouds, and the threshold (or
    the dtype default) how bright a cloud is; the code is the ingest and store packages.
    """
    code = code_key("tasks.ingest", "tasks.store")
    keys = {}
    for p in pairs.itertuples(index=False):
        sc = scenes[p.scene_id]
        window = [int(p.col_off), int(p.row_off), int(p.width), int(p.height)]
        keys[tile_unit(p.site_id, p.scene_id)] = content_key(
            "ingest/tile",
            sc.file_hash,
            p.crs,
            [float(v) for v in p.transform],
            window,
            cloud_threshold,
            list(sc.band_names),
            code,
        )
    return keys


def tile_stats(pairs: pd.DataFrame, scenes: dict[str, Scene], cloud_threshold: float | None) -> pd.DataFrame:
    """Statistics of every (site, scene) tile in ``pairs``; runs on the active Dask scheduler.

    Each scene is a lazy Dask array (rioxarray) chunked along whole COG blocks. The tiles whose top-left
    corner lies in the same chunk make one task, which receives the chunks those tiles overlap: every
    chunk is read once per call, and a task holds a few chunks, never a scene.
    """
    results: list = [None] * len(pairs)  # per pair, in order: its group's task (shared within the group)
    slots = [0] * len(pairs)  # per pair: its place in the group's list of statistics
    for scene_id, rows in pairs.groupby("scene_id", sort=False).indices.items():
        sc = scenes[scene_id]
        with rasterio.open(sc.path) as src:
            block_h, block_w = src.block_shapes[0]
        ch = _whole_blocks(_CHUNK_ROWS, block_h, sc.height)
        cw = _whole_blocks(_CHUNK_COLS, block_w, sc.width)
        da = rioxarray.open_rasterio(
            sc.path, chunks={"band": -1, "y": ch, "x": cw}, lock=False, cache=False, masked=False
        ).data
        chunks = da.to_delayed()[0]
        row_edges, col_edges = np.cumsum((0, *da.chunks[1])), np.cumsum((0, *da.chunks[2]))
        part = pairs.iloc[rows]
        ro, co = part["row_off"].to_numpy(), part["col_off"].to_numpy()
        r0, c0 = np.maximum(ro, 0), np.maximum(co, 0)
        ro_end, co_end = ro + part["height"].to_numpy(), co + part["width"].to_numpy()
        r1, c1 = np.minimum(ro_end, sc.height), np.minimum(co_end, sc.width)
        fill = sc.nodata if sc.nodata is not None else 0
        vis = visible_bands(sc.band_names)
        dn = cloud_dn(sc.dtype, cloud_threshold)
        gi = np.searchsorted(row_edges, np.clip(r0, 0, sc.height - 1), side="right") - 1
        gj = np.searchsorted(col_edges, np.clip(c0, 0, sc.width - 1), side="right") - 1
        groups: dict[tuple[int, int], list[int]] = {}
        for k, key in enumerate(zip(gi.tolist(), gj.tolist(), strict=True)):
            groups.setdefault(key, []).append(k)
        for (i, j), ks in sorted(groups.items()):
            i1 = np.searchsorted(row_edges, max(r1[ks].max(), r0[ks].max() + 1) - 1, side="right") - 1
            j1 = np.searchsorted(col_edges, max(c1[ks].max(), c0[ks].max() + 1) - 1, side="right") - 1
            i1, j1 = min(i1, len(row_edges) - 2), min(j1, len(col_edges) - 2)
            y0, x0 = row_edges[i], col_edges[j]
            tiles = []
            for k in ks:
                pad = ((r0[k] - ro[k], ro_end[k] - r1[k]), (c0[k] - co[k], co_end[k] - c1[k]))
                tiles.append(((r0[k] - y0, r1[k] - y0, c0[k] - x0, c1[k] - x0), pad, fill))
            sub = [list(chunks[a, j : j1 + 1]) for a in range(i, i1 + 1)]
            task = dask.delayed(_group_stats)(
                sub, row_edges[i : i1 + 2] - y0, col_edges[j : j1 + 2] - x0, tiles, sc.nodata, vis, dn
            )
            for slot, k in enumerate(ks):
                results[rows[k]], slots[rows[k]] = task, slot
    try:
        stats = dask.compute(*results)
    except Exception as exc:
        # A truncated file surfaces as a GDAL read error deep in the graph (on a worker, possibly as
        # another type); recompute scene by scene to name the file(s) that fail, not the whole batch.
        if not _is_read_error(exc):
            raise
        ids = list(pairs.scene_id)
        bad = []
        for sid in dict.fromkeys(ids):
            try:
                dask.compute(*[r for r, s in zip(results, ids, strict=True) if s == sid])
            except Exception:
                bad.append(scenes[sid].path)
        paths = bad or sorted({scenes[s].path for s in ids})
        raise InputError(", ".join(paths), f"corrupt or truncated imagery: {exc}") from None
    stats = [group[slot] for group, slot in zip(stats, slots, strict=True)]
    out = pairs[["site_id", "scene_id", "crs", "transform", "width", "height"]].reset_index(drop=True).copy()
    out["band_names"] = [list(scenes[s].band_names) for s in out.scene_id]
    stats_df = pd.DataFrame(list(stats))
    return pd.concat([out, stats_df], axis=1)


def _is_read_error(exc: BaseException) -> bool:
    return (
        isinstance(exc, RasterioIOError)
        or "rasterio" in type(exc).__module__
        or "TIFF" in str(exc)
        or "Read" in str(exc)
    )


def window_of(pair) -> Window:
    return Window(pair.col_off, pair.row_off, pair.width, pair.height)
