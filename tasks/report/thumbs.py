"""Small PNG panels of one site: true colour, each labeller's polygons, consensus, risk or probability heat.

Drawn with Pillow straight onto the site grid (no matplotlib figure per panel: 20 sites x 8 panels must
take well under a second each) and palette-quantised, so a panel is a few kB and pages stay small.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from pathlib import Path

import numpy as np
import rasterio
from matplotlib import colormaps
from PIL import Image, ImageDraw
from rasterio.enums import Resampling

from tasks.report.imagery import rgb_image
from tasks.store.artifacts import unshare
from tasks.store.grid import SiteGrid

CLASS_COLOURS = {"crop": (74, 222, 128), "fallow": (251, 191, 36), "issue": (239, 68, 68)}
OTHER_COLOURS = [(56, 189, 248), (244, 114, 182), (167, 139, 250), (248, 113, 113)]
UNCLASSED = (226, 232, 240)


def safe_name(text: str) -> str:
    """A file-name stem for a user-supplied id: readable part plus a hash, never a path."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", str(text))[:40].strip("_") or "x"
    return f"{stem}-{hashlib.blake2b(str(text).encode(), digest_size=4).hexdigest()}"


def class_colour(label, classes: list[str]) -> tuple[int, int, int]:
    if label is None or label != label:  # None or NaN: unclassed field
        return UNCLASSED
    if label in CLASS_COLOURS:
        return CLASS_COLOURS[label]
    i = classes.index(label) if label in classes else zlib.crc32(str(label).encode())
    return OTHER_COLOURS[i % len(OTHER_COLOURS)]


def _pixels(grid: SiteGrid, px: int, coords) -> list[tuple[float, float]]:
    """Map coordinates in the grid CRS → thumbnail pixel coordinates (vectorised inverse affine)."""
    inv = ~grid.affine
    xy = np.asarray(coords, dtype=float)[:, :2]
    cols = (inv.a * xy[:, 0] + inv.b * xy[:, 1] + inv.c) * (px / grid.width)
    rows = (inv.d * xy[:, 0] + inv.e * xy[:, 1] + inv.f) * (px / grid.height)
    return list(zip(cols.tolist(), rows.tolist(), strict=True))


def _rings(geom):
    polys = getattr(geom, "geoms", [geom])
    for p in polys:
        if p.is_empty or p.geom_type != "Polygon":
            continue
        yield p.exterior.coords, [i.coords for i in p.interiors]


def draw_polygons(
    base: np.ndarray, grid: SiteGrid, polys, classes: list[str], dim: float = 0.55
) -> Image.Image:
    """Polygons (iterable of (label, geometry) in the grid CRS) filled by class over a dimmed image."""
    img = Image.fromarray((base.astype(np.float32) * dim).astype(np.uint8)).convert("RGBA")
    over = Image.new("RGBA", img.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(over)
    px = base.shape[0]
    for label, geom in polys:
        col = class_colour(label, classes)
        for ext, holes in _rings(geom):
            d.polygon(_pixels(grid, px, ext), fill=(*col, 110), outline=(*col, 255))
            for h in holes:
                d.polygon(_pixels(grid, px, h), fill=(0, 0, 0, 0), outline=(*col, 255))
    return Image.alpha_composite(img, over).convert("RGB")


def read_band(path: Path | None, band: int, px: int) -> np.ndarray | None:
    if path is None:
        return None
    try:
        with rasterio.open(path) as ds:
            return ds.read(band, out_shape=(px, px), resampling=Resampling.nearest).astype(np.float32)
    except (rasterio.errors.RasterioError, OSError):
        return None


def heat(base: np.ndarray, values: np.ndarray, vmax: float, cmap: str = "magma") -> Image.Image:
    """``values`` in [0, vmax] as a colour heat over a greyed image; NaN (outside the footprint) left grey."""
    grey = base.mean(axis=2, keepdims=True).repeat(3, axis=2) * 0.5
    rgba = colormaps[cmap](np.clip(np.nan_to_num(values, nan=0.0) / vmax, 0, 1))[..., :3] * 255
    mix = np.where(np.isfinite(values)[..., None], 0.25 * grey + 0.75 * rgba, grey)
    return Image.fromarray(mix.round().astype(np.uint8))


def save_png(img: Image.Image, path: Path) -> None:
    img.convert("RGB").quantize(colors=96).save(unshare(path), optimize=True)


def field_probability(path: Path | None, px: int) -> np.ndarray | None:
    """p(field) from a probability raster: 1 band = p(field); 2 = (background, field); 3+ = 1 - background."""
    if path is None:
        return None
    try:
        with rasterio.open(path) as ds:
            if ds.count == 1:
                return ds.read(1, out_shape=(px, px), resampling=Resampling.nearest).astype(np.float32)
            if ds.count == 2:
                return ds.read(2, out_shape=(px, px), resampling=Resampling.nearest).astype(np.float32)
            return 1.0 - ds.read(1, out_shape=(px, px), resampling=Resampling.nearest).astype(np.float32)
    except (rasterio.errors.RasterioError, OSError):
        return None


def site_panels(
    grid: SiteGrid,
    scene_path: str | None,
    band_names: list[str],
    out_dir: Path,
    rel: str,
    classes: list[str],
    px: int,
    labeller_polys: dict[str, list] | None = None,
    overlays: dict[str, list] | None = None,
    heat_values: tuple[str, np.ndarray | None, float, str] | None = None,
    band_range: tuple | None = None,
    stem: str | None = None,
) -> dict:
    """Write the panels of one site under ``out_dir``; return their paths relative to the report root.

    ``overlays`` maps a panel name (consensus, issue, pseudo) to (label, geometry) pairs in the grid CRS;
    ``heat_values`` is (panel name, px x px array, vmax, colormap). ``stem`` starts the file names
    (default: from the site id); panels of one site drawn twice with other content need their own.
    """
    lo, hi = band_range or (None, None)
    base = rgb_image(scene_path, grid, band_names, px, lo, hi) if scene_path else None
    note = None
    if base is None:
        base = np.full((px, px, 3), 128, np.uint8)
        note = "imagery not readable"
    stem = stem or safe_name(grid.site_id)
    out: dict = {"site_id": grid.site_id, "note": note}

    def put(img: Image.Image, suffix: str) -> str:
        name = f"{stem}-{suffix}.png"
        save_png(img, out_dir / name)
        return f"{rel}/{name}"

    out["image"] = put(Image.fromarray(base), "img")
    if labeller_polys is not None:
        out["labellers"] = [
            {
                "labeller_id": lid,
                "src": put(draw_polygons(base, grid, polys, classes), f"l{i}"),
                "polygons": len(polys),
            }
            for i, (lid, polys) in enumerate(sorted(labeller_polys.items()))
        ]
    for name, polys in (overlays or {}).items():
        out[name] = put(draw_polygons(base, grid, polys, classes), name)
    if heat_values is not None and heat_values[1] is not None:
        name, values, vmax, cmap = heat_values
        out[name] = put(heat(base, values, vmax, cmap), name)
    return out
