"""Pixels for the report: scene footprints, per-band histograms and site windows read from the scenes.

Reads are decimated (overviews) for whole-scene statistics and windowed for sites, so a 10x region
costs seconds, not a full read of every scene.
"""

from __future__ import annotations

import math

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.warp import transform_geom
from rasterio.windows import from_bounds
from shapely.geometry import box, shape

from tasks.store.grid import SiteGrid

RGB_NAMES = (("r", "red", "b04"), ("g", "green", "b03"), ("b", "blue", "b02"))


def rgb_indexes(band_names: list[str]) -> list[int]:
    """1-based indexes of the R, G, B bands by name; the first three bands when the names say nothing."""
    low = [str(b).lower() for b in band_names]
    idx = []
    for aliases in RGB_NAMES:
        hit = next((i for i, b in enumerate(low) if b in aliases), None)
        if hit is None:
            return [1, 2, 3][: max(1, min(3, len(band_names)))]
        idx.append(hit + 1)
    return idx


def scene_footprints(paths: dict[str, str]) -> list[tuple[str, object]]:
    """(scene_id, EPSG:4326 polygon) of each readable scene."""
    out = []
    for sid, path in sorted(paths.items()):
        try:
            with rasterio.open(path) as ds:
                geom = transform_geom(ds.crs, "EPSG:4326", box(*ds.bounds).__geo_interface__)
        except (rasterio.errors.RasterioError, OSError):
            continue
        out.append((sid, shape(geom)))
    return out


# Pixels per band that the band histograms read over all scenes together (each scene decimated to its share).
# A fixed budget keeps the report stage's memory flat in the number of scenes: the former 256-px read per
# scene held 13 M float32 pixels per band for a 100x region's 200 scenes (~0.4 GiB for 4 bands and a copy).
HISTOGRAM_PIXELS = 2**21


def histogram_side(n_scenes: int, budget: int = HISTOGRAM_PIXELS) -> int:
    """Longest side of each scene's decimated read: 512 px up to 8 scenes, then shrinking (>= 16 px)."""
    return max(16, min(512, math.isqrt(budget // max(1, n_scenes))))


def band_histograms(paths: dict[str, str], bins: int = 64, budget: int = HISTOGRAM_PIXELS) -> list[dict]:
    """Histogram of each band over the valid pixels of every scene, on decimated reads (overviews) that
    together read at most ``budget`` pixels per band (a scene smaller than its share is read as it is)."""
    side = histogram_side(len(paths), budget)
    arrays, names = [], None
    for path in paths.values():
        try:
            with rasterio.open(path) as ds:
                scale = max(1.0, max(ds.width, ds.height) / side)
                shape_ = (ds.count, max(1, round(ds.height / scale)), max(1, round(ds.width / scale)))
                a = ds.read(out_shape=shape_, resampling=Resampling.nearest).reshape(ds.count, -1)
                names = names or [d or f"b{i + 1}" for i, d in enumerate(ds.descriptions)]
                valid = np.ones(a.shape[1], bool) if ds.nodata is None else (a != ds.nodata).all(axis=0)
                arrays.append(a[:, valid].astype(np.float32))
        except (rasterio.errors.RasterioError, OSError):
            continue
    if not arrays or names is None:
        return []
    n = min(a.shape[0] for a in arrays)
    data = np.concatenate([a[:n] for a in arrays], axis=1)
    out = []
    for i in range(n):
        v = data[i][np.isfinite(data[i])]
        if not len(v):
            continue
        lo, hi = np.percentile(v, [0.5, 99.5])
        hi = hi if hi > lo else lo + 1
        counts, edges = np.histogram(np.clip(v, lo, hi), bins=bins, range=(lo, hi))
        out.append(
            {
                "band": str(names[i]),
                "edges": [round(float(e), 3) for e in edges],
                "counts": [int(c) for c in counts],
                "pixels": len(v),
            }
        )
    return out


def read_window(
    path: str,
    grid: SiteGrid,
    indexes: list[int] | None = None,
    out_px: int | None = None,
    datasets: dict | None = None,
):
    """The site's pixels as float32 ``(bands, h, w)`` with NaN where nodata; None when unreadable.

    ``datasets`` (path -> open dataset, filled here; the caller closes them) keeps scenes open across
    calls. A full-resolution window inside the scene is read directly (the same pixels as a boundless
    read, without its virtual warped dataset)."""
    try:
        if datasets is None:
            with rasterio.open(path) as ds:
                return _read_window(ds, grid, indexes, out_px)
        if path not in datasets:
            datasets[path] = rasterio.open(path)
        return _read_window(datasets[path], grid, indexes, out_px)
    except (rasterio.errors.RasterioError, OSError, ValueError):
        return None


def _read_window(ds, grid: SiteGrid, indexes: list[int] | None, out_px: int | None) -> np.ndarray:
    win = from_bounds(*grid.bounds, transform=ds.transform).round_offsets().round_lengths()
    idx = indexes or list(range(1, ds.count + 1))
    h, w = (out_px, out_px) if out_px else (int(win.height), int(win.width))
    inside = (
        win.col_off >= 0
        and win.row_off >= 0
        and win.col_off + win.width <= ds.width
        and win.row_off + win.height <= ds.height
    )
    if out_px is None and inside:
        a = ds.read(idx, window=win).astype(np.float32)
    else:
        a = ds.read(
            idx,
            window=win,
            out_shape=(len(idx), h, w),
            boundless=True,
            fill_value=ds.nodata or 0,
            resampling=Resampling.nearest,
        ).astype(np.float32)
    if ds.nodata is not None:
        a[:, (a == ds.nodata).any(axis=0)] = np.nan
    return a


def stretch(a: np.ndarray, lo=None, hi=None) -> np.ndarray:
    """2-98 % linear stretch per band to [0, 1] (NaN kept); ``lo``/``hi`` fix the range across sites."""
    out = np.empty_like(a, dtype=np.float32)
    for i, band in enumerate(a):
        v = band[np.isfinite(band)]
        b_lo, b_hi = (np.percentile(v, [2, 98]) if len(v) else (0.0, 1.0)) if lo is None else (lo[i], hi[i])
        out[i] = (band - b_lo) / max(b_hi - b_lo, 1e-6)
    return np.clip(out, 0, 1, where=np.isfinite(out), out=out)


def rgb_image(
    path: str, grid: SiteGrid, band_names: list[str], px: int, lo=None, hi=None
) -> np.ndarray | None:
    """``(px, px, 3)`` uint8 true-colour thumbnail; nodata shown mid grey.

    ``lo``/``hi`` (per band, all bands) fix the 2-98 % stretch region-wide, so thumbnails are comparable and
    a bright cloud does not darken its site; without them each site is stretched on its own pixels.
    """
    idx = rgb_indexes(band_names)
    a = read_window(path, grid, idx, px)
    if a is None:
        return None
    if lo is not None and hi is not None:
        lo, hi = [lo[i - 1] for i in idx], [hi[i - 1] for i in idx]
    s = stretch(a, lo, hi)
    if s.shape[0] == 1:
        s = np.repeat(s, 3, axis=0)
    img = np.nan_to_num(s, nan=0.5).transpose(1, 2, 0)
    return (img * 255).round().astype(np.uint8)
