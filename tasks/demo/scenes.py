"""Paint one scene: rasterise the ground objects, add texture, clouds, shadows, nodata; write a COG.

One scene is built at a time, band by band in float32, so memory stays at a few scene-sized arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.features import rasterize
from scipy import ndimage

from tasks.demo.fields import SiteGround
from tasks.demo.layout import BAND_NAMES, CRS, SITE_PX, SiteBox, scene_px, scene_transform

TAG_SCENE = 2
# Reflectance x 10^4 in (B, G, R, NIR) and texture amplitude (relative).
SIGNATURES: dict[str, tuple[tuple[float, float, float, float], float]] = {
    "crop": ((380, 650, 420, 3600), 0.06),
    "fallow": ((850, 1150, 1550, 2500), 0.08),
    "grass": ((600, 950, 1050, 2700), 0.10),
    "shrub": ((450, 720, 700, 2200), 0.14),
    "bare": ((1250, 1650, 2300, 2900), 0.08),
    "water": ((750, 620, 380, 220), 0.03),
    "settlement": ((1150, 1350, 1600, 2100), 0.12),
    "road": ((1400, 1500, 1650, 1900), 0.05),
    "roof": ((1800, 1900, 2100, 2300), 0.05),
    "roof_dark": ((600, 650, 700, 900), 0.05),
    "boundary": ((300, 420, 520, 1100), 0.05),
}
NATURAL = ("grass", "shrub", "bare")  # background mix, shares below
NATURAL_SHARE = (0.5, 0.35, 0.15)
CLOUD = np.array([5200, 5400, 5600, 5900], dtype=np.float32)


@dataclass
class SceneResult:
    path: Path
    nodata: np.ndarray  # (H, W) bool
    cloud: np.ndarray  # (H, W) bool, cloud alpha > 0.5

    def site_masks(self, site: SiteBox) -> tuple[np.ndarray, np.ndarray]:
        sl = np.s_[site.px_y : site.px_y + SITE_PX, site.px_x : site.px_x + SITE_PX]
        return self.nodata[sl], self.cloud[sl]


def _smooth(rng: np.random.Generator, shape: tuple[int, int], factor: int, sigma: float) -> np.ndarray:
    """Spatially correlated noise (zero mean, unit std): blurred coarse noise, bilinearly upsampled."""
    h, w = shape
    low = rng.standard_normal((h // factor + 2, w // factor + 2), dtype=np.float32)
    low = ndimage.gaussian_filter(low, sigma)
    up = ndimage.zoom(low, factor, order=1)[:h, :w]
    return (up - up.mean()) / (up.std() + 1e-6)


def _parcel_table(kinds: list[str], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-parcel signature with per-parcel variation (index 0 = natural background, filled later)."""
    sig = np.zeros((len(kinds) + 1, 4), dtype=np.float32)
    amp = np.full(len(kinds) + 1, SIGNATURES["grass"][1], dtype=np.float32)
    for i, k in enumerate(kinds, start=1):
        base, a = SIGNATURES[k]
        gain = rng.uniform(0.88, 1.12) * (1 + 0.04 * rng.standard_normal(4))
        if k == "crop":  # growth stage: greener or paler canopy
            gain *= np.array([1.0, 1.0, rng.uniform(0.8, 1.3), rng.uniform(0.8, 1.1)])
        sig[i] = np.asarray(base) * gain
        amp[i] = a
    return sig, amp


def _nodata_mask(scene_idx: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """scene_000 always loses its top-left corner (a swath edge); every 7th scene loses a bottom-right one."""
    yy, xx = np.ogrid[:n, :n]
    if scene_idx == 0:
        return (xx + yy) < int(0.42 * n)
    if scene_idx % 7 == 3:
        return (xx + yy) > int(rng.uniform(1.6, 1.8) * n)
    return np.zeros((n, n), dtype=bool)


def render_scene(
    out_path: Path,
    scene_idx: int,
    sites_per_side: int,
    grounds: list[SiteGround],
    seed: int,
) -> SceneResult:
    rng = np.random.default_rng([seed, TAG_SCENE, scene_idx])
    n = scene_px(sites_per_side)
    transform = scene_transform(scene_idx, sites_per_side)

    geoms: list = []
    kinds: list[str] = []
    for layer in ("objects", "fields", "top"):
        for g in grounds:
            for geom, kind in getattr(g, layer):
                if not geom.is_empty:
                    geoms.append(geom)
                    kinds.append(kind)
    sig, amp = _parcel_table(kinds, rng)
    idx = (
        rasterize(
            zip(geoms, range(1, len(geoms) + 1), strict=True),
            out_shape=(n, n),
            transform=transform,
            fill=0,
            dtype="int32",
        )
        if geoms
        else np.zeros((n, n), dtype=np.int32)
    )

    # Natural background: a smooth mix of grass, shrub and bare soil.
    nat = _smooth(rng, (n, n), 8, 3.0)
    cuts = np.quantile(nat[::8, ::8], np.cumsum(NATURAL_SHARE)[:-1])
    nat_cls = np.digitize(nat, cuts).astype(np.int8)
    nat_sig = np.array([SIGNATURES[k][0] for k in NATURAL], dtype=np.float32)
    is_bg = idx == 0
    amp_px = amp[idx]
    del nat

    fine = ndimage.gaussian_filter(rng.standard_normal((n, n), dtype=np.float32), 1.5)
    fine /= fine.std() + 1e-6
    coarse = _smooth(rng, (n, n), 16, 4.0)
    texture = 1.0 + amp_px * fine + 0.05 * coarse
    del fine, amp_px

    cloud_frac = rng.uniform(0.02, 0.08)
    cl = _smooth(rng, (n, n), 8, 4.0)
    thr = np.quantile(cl[::8, ::8], 1.0 - cloud_frac)
    alpha = np.clip((cl - thr) / 0.6 + 0.5, 0.0, 1.0)
    del cl
    sh = int(rng.integers(8, 20))
    shadow = np.zeros_like(alpha)
    shadow[sh:, sh:] = alpha[:-sh, :-sh]
    shade = 1.0 - 0.45 * shadow * (1.0 - alpha)
    del shadow
    nodata = _nodata_mask(scene_idx, n, rng)
    gain, offset = rng.uniform(0.85, 1.2), rng.uniform(-40, 120)

    out = np.empty((4, n, n), dtype=np.uint16)
    for b in range(4):
        band = sig[:, b][idx]
        band[is_bg] = nat_sig[:, b][nat_cls[is_bg]]
        band *= texture
        band += rng.normal(0.0, 20.0, (n, n)).astype(np.float32)
        band = band * gain + offset
        band *= shade
        band = band * (1.0 - alpha) + alpha * CLOUD[b] * (1.0 + 0.03 * coarse)
        np.clip(band, 1, 10_000, out=band)
        out[b] = np.rint(band).astype(np.uint16)
        out[b][nodata] = 0
    del texture, idx, is_bg, nat_cls

    _write_cog(out_path, out, transform)
    return SceneResult(path=out_path, nodata=nodata, cloud=alpha > 0.5)


def _write_cog(path: Path, data: np.ndarray, transform) -> None:
    """COG: 256x256 tiles with internal overviews; no timestamps in the file, so bytes are reproducible."""
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {
        "driver": "COG",
        "width": data.shape[2],
        "height": data.shape[1],
        "count": data.shape[0],
        "dtype": "uint16",
        "crs": CRS,
        "transform": transform,
        "nodata": 0,
        "compress": "zstd",
        "predictor": 2,
        "blocksize": 256,
        "overview_resampling": "average",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        for i, name in enumerate(BAND_NAMES, start=1):
            dst.set_band_description(i, name)
