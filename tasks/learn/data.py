"""Pixels and targets per site: windowed scene reads, normalisation, consensus -> class map + weights.

Classes (``model.CLASSES``): 0 background, 1 field interior, 2 field boundary = the inner ``boundary_px``
ring of every field. The ring is what lets two touching fields come apart when vectorising; consensus
polygons cannot provide it (one consensus polygon per connected region of one class merges touching
fields), so on consensus sites the internal edges come from the voters' own polygons: an edge that at
least ``edge_vote_share`` of the site's voters drew. Gold sites use the reference polygons as drawn.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
from rasterio.features import rasterize
from rasterio.windows import Window
from scipy import ndimage

from tasks.store.errors import InputError
from tasks.store.grid import SiteGrid
from tasks.store.reuse import content_key

# The ingest stage's cloud rule (visible-band mean above a DN), repeated here because stages share
# artifacts, not code; `tiles.cloud_fraction` is computed with the same rule.
VISIBLE = {"b", "g", "r", "blue", "green", "red", "b02", "b03", "b04"}


def cloud_dn(dtype: str, threshold: float | None) -> float:
    if threshold is not None:
        return float(threshold)
    return 220.0 if dtype == "uint8" else 0.45 if dtype.startswith("float") else 4500.0


def scene_paths(pattern: str) -> dict[str, str]:
    """scene_id (file stem) -> path, for every file the catalog's ``imagery`` glob matches."""
    paths = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
    return {Path(p).stem: p for p in paths if Path(p).is_file()}


def band_stats(tiles: pd.DataFrame, sites: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Pooled per-band mean and std over the valid pixels of every site's own tile (from ``tiles``)."""
    own = tiles.merge(sites[["site_id", "scene_id"]], on=["site_id", "scene_id"])
    mean = np.array(own["mean"].tolist(), dtype=np.float64)
    std = np.array(own["std"].tolist(), dtype=np.float64)
    n = (own["valid_fraction"] * own["width"] * own["height"]).to_numpy(np.float64)
    ok = np.isfinite(mean).all(axis=1) & np.isfinite(std).all(axis=1) & (n > 0)
    if not ok.any():
        raise InputError("tiles", "no site tile has a valid pixel: nothing to normalise or learn from")
    mean, std, n = mean[ok], std[ok], n[ok, None]
    mu = (n * mean).sum(0) / n.sum()
    var = (n * (std**2 + (mean - mu) ** 2)).sum(0) / n.sum()
    names = list(own["band_names"].iloc[int(np.argmax(ok))])
    return mu.astype(np.float32), np.sqrt(np.maximum(var, 1e-12)).astype(np.float32), names


@dataclass
class SitePixels:
    """A site's normalised tile (C, H, W; 0 where invalid) and its validity mask (not nodata, not cloud)."""

    site_id: str
    grid: SiteGrid
    x: np.ndarray
    valid: np.ndarray

    @property
    def valid_fraction(self) -> float:
        return float(self.valid.mean())


def read_window(path: str, grid: SiteGrid) -> tuple[np.ndarray, float | None, list[str], str]:
    """The raw pixels of the site's grid in its scene (bands, H, W), the nodata value, band names, dtype.

    Pixels outside the scene read as nodata.
    """
    with rasterio.open(path) as src:
        inv = ~src.transform
        col, row = inv @ (grid.transform[2], grid.transform[5])
        win = Window(round(col), round(row), grid.width, grid.height)
        nodata = src.nodata
        inside = win.col_off >= 0 and win.row_off >= 0
        inside = inside and win.col_off + win.width <= src.width and win.row_off + win.height <= src.height
        fill = nodata if nodata is not None else 0
        arr = src.read(window=win) if inside else src.read(window=win, boundless=True, fill_value=fill)
        names = [str(d or "").lower() for d in src.descriptions]
        dtype = src.dtypes[0]
    return arr, nodata, names, dtype


def window_key(path: str, grid: SiteGrid) -> str:
    """Content key of the raw window ``read_site`` reads (when the ingest stage recorded no tile key)."""
    arr, nodata, names, dtype = read_window(path, grid)
    return content_key("window", arr, repr(nodata), names, dtype, list(grid.transform), grid.crs)


def read_site(
    path: str, grid: SiteGrid, mean: np.ndarray, std: np.ndarray, cloud_threshold: float | None
) -> SitePixels:
    """Windowed read of the site's grid from its scene; pixels outside the scene read as nodata."""
    arr, nodata, names, dtype = read_window(path, grid)
    if arr.shape[0] != len(mean):
        raise InputError(path, f"{arr.shape[0]} bands, but the tiles table has statistics for {len(mean)}")
    if nodata is None:
        valid = np.ones(arr.shape[1:], bool)
    elif np.isnan(nodata):
        valid = ~np.isnan(arr).any(axis=0)
    else:
        valid = ~(arr == nodata).any(axis=0)
    vis = [i for i, n in enumerate(names) if n in VISIBLE]
    if vis:
        valid &= ~(arr[vis].astype(np.float32).mean(axis=0) > cloud_dn(dtype, cloud_threshold))
    x = (arr.astype(np.float32) - mean[:, None, None]) / std[:, None, None]
    x[:, ~valid] = 0.0
    return SitePixels(grid.site_id, grid, np.nan_to_num(x, copy=False), valid)


def rasterise_ids(grid: SiteGrid, geoms) -> np.ndarray:
    """Polygons -> int32 instance ids 1..n on the site grid (pixel-centre rule; later polygons on top)."""
    shapes = [(g, i + 1) for i, g in enumerate(geoms) if g is not None and not g.is_empty]
    if not shapes:
        return np.zeros((grid.height, grid.width), np.int32)
    return rasterize(shapes, (grid.height, grid.width), transform=grid.affine, fill=0, dtype="int32")


def instance_edges(ids: np.ndarray, width: int = 1) -> np.ndarray:
    """Pixels of an instance within ``width`` px of another id (background or another instance).

    The tile border is not an edge: fields cut by the site edge go on outside it.
    """
    edge = np.zeros(ids.shape, bool)
    dv = ids[1:] != ids[:-1]
    edge[1:] |= dv
    edge[:-1] |= dv
    dh = ids[:, 1:] != ids[:, :-1]
    edge[:, 1:] |= dh
    edge[:, :-1] |= dh
    edge &= ids > 0
    if width > 1:
        inner = ndimage.binary_dilation(edge, iterations=width - 1)
        edge = inner & (ids > 0)
    return edge


def classes_from(field: np.ndarray, boundary: np.ndarray) -> np.ndarray:
    target = field.astype(np.uint8)
    target[field & boundary] = 2
    return target


def gold_target(grid: SiteGrid, ref_geoms, boundary_px: int) -> np.ndarray:
    """Target classes from the reference polygons as drawn (each polygon its own instance)."""
    ids = rasterise_ids(grid, ref_geoms)
    return classes_from(ids > 0, instance_edges(ids, boundary_px))


def consensus_target(prob: np.ndarray, voter_geoms: list[list], grid: SiteGrid, params) -> np.ndarray:
    """Target classes from the consensus probability plus the voters' edges.

    Field = probability >= ``field_threshold``; boundary = the field's own outline ring plus every edge
    that ``edge_vote_share`` of the voters drew inside it (voters without polygons count: they drew none).
    """
    field = np.nan_to_num(prob, nan=0.0) >= params.field_threshold
    boundary = instance_edges(field.astype(np.int32), params.boundary_px)
    if voter_geoms:
        share = np.zeros(field.shape, np.float32)
        for geoms in voter_geoms:
            share += instance_edges(rasterise_ids(grid, geoms), params.boundary_px)
        boundary |= share >= params.edge_vote_share * len(voter_geoms) - 1e-6
    return classes_from(field, boundary)


def consensus_weight(risk: np.ndarray) -> np.ndarray:
    """1 - 2r: 1 where the consensus is certain, 0 at a coin flip; NaN (outside the footprint) -> 0."""
    return np.clip(1.0 - 2.0 * np.nan_to_num(risk, nan=0.5), 0.0, 1.0).astype(np.float32)


def read_consensus(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with rasterio.open(path) as src:
        prob, risk = src.read(1), src.read(2)
    return prob, risk


def site_labels(
    labels: pd.DataFrame, assignments: pd.DataFrame, reference_labellers
) -> tuple[dict[str, list], dict[str, list[list]]]:
    """Per site: the reference polygons (earliest completed reference, ties by id) and each voter's list.

    A voter is a completed, non-reference assignment, with or without polygons.
    """
    done = assignments[assignments["status"] == "completed"].copy()
    done["is_ref"] = done["is_reference"].astype(bool) | done["labeller_id"].isin(list(reference_labellers))
    by_site_lab = (
        {k: list(g["geometry"]) for k, g in labels.groupby(["site_id", "labeller_id"], sort=False)}
        if len(labels)
        else {}
    )
    refs: dict[str, list] = {}
    voters: dict[str, list[list]] = {}
    for site_id, g in done.groupby("site_id", sort=True):
        r = g[g["is_ref"]].sort_values(["completed_at", "labeller_id"], na_position="last")
        if len(r):
            refs[str(site_id)] = by_site_lab.get((site_id, r["labeller_id"].iloc[0]), [])
        v = g[~g["is_ref"]].sort_values("labeller_id")
        voters[str(site_id)] = [by_site_lab.get((site_id, lab), []) for lab in v["labeller_id"]]
    return refs, voters
