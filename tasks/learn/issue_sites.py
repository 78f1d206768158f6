"""Per-site inputs of the ``label_issues`` stage: what a batch needs to know about a site, and its arrays.

A ``SiteWork`` names the site's grid, its crowd labellers' polygons and where its probabilities and
consensus live; batches read rasters (and, for large passes, polygons) themselves, so a Dask graph holds
ids and paths rather than the region's data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import rasterio
from rasterio.features import rasterize

from tasks.learn.pixel_issues import IssueParams, field_probability, quantise
from tasks.learn.site_inputs import read_label_rows
from tasks.store.errors import InputError
from tasks.store.grid import SiteGrid


@dataclass
class SiteWork:
    """One site's inputs for both passes (picklable). Probabilities and consensus come either as arrays
    or as GeoTIFF paths read inside the batch; ``prob_kind="consensus"`` reads band 1 of a consensus
    raster as p(field) (the stand-in before a model exists). Polygons likewise: ids and geometries, or
    (None, None) and ``labels_path``: read by site inside the batch, so a task graph never carries them."""

    grid: SiteGrid
    labellers: dict[str, tuple[list[str] | None, list | None]]  # crowd labeller -> (polygon ids, geometries)
    consensus_independent: bool  # gold site or >= 2 crowd voters: the consensus is not just this labeller
    probs: np.ndarray | None = None
    prob_path: str | None = None
    prob_kind: str = "oos"
    consensus: np.ndarray | None = None
    consensus_path: str | None = None
    labels_path: str | None = None  # geometries None: read them from this labels table inside the batch

    site_id = property(lambda self: self.grid.site_id)
    has_probabilities = property(lambda self: self.probs is not None or self.prob_path is not None)


def read_site_probabilities(path: str | Path, grid: SiteGrid, kind: str = "oos") -> np.ndarray:
    """(bands, H, W) float32 from a GeoTIFF on the site's grid; ``kind="consensus"`` turns band 1 of a
    consensus raster into (2, H, W) [1 - p, p]. Raise ``InputError`` when the file does not fit the grid."""
    try:
        with rasterio.open(path) as src:
            if (src.height, src.width) != (grid.height, grid.width):
                raise InputError(
                    path, f"raster is {src.height}x{src.width}, site grid {grid.height}x{grid.width}"
                )
            if src.crs is not None and src.crs != rasterio.crs.CRS.from_user_input(grid.crs):
                raise InputError(path, f"raster CRS {src.crs} differs from the site grid CRS {grid.crs}")
            if not src.transform.almost_equals(grid.affine, precision=1e-6 * max(grid.pixel_size, 1.0)):
                raise InputError(path, f"raster transform {tuple(src.transform)[:6]} is not the site grid's")
            if kind == "consensus":
                p = src.read(1).astype(np.float32)
                return np.stack([1 - p, p])
            if src.count not in (2, 3):
                raise InputError(
                    path, f"expected 3 bands (background, interior, boundary); found {src.count}"
                )
            return src.read().astype(np.float32)
    except rasterio.errors.RasterioIOError as exc:
        raise InputError(path, f"cannot read raster ({exc})") from None


def build_work(
    sites, labels, assignments, reference_labellers: Sequence[str] = (), labels_path: str | Path | None = None
) -> list[SiteWork]:
    """One SiteWork per site with >= 1 completed crowd (non-reference) assignment, polygons in native CRS
    from ``labels``; or, with ``labels_path`` instead (``labels`` None), none: ids and geometries are read
    inside the batches, and the region's polygon ids are never held here (at 100x ~190 MiB)."""
    refs = set(map(str, reference_labellers))
    a = assignments[assignments["status"].astype(str) == "completed"]
    a_lid = a["labeller_id"].astype(str)
    is_ref = (a["is_reference"].fillna(False).astype(bool) | a_lid.isin(refs)).tolist()
    crowd_of: dict[str, set[str]] = {}
    with_ref: set[str] = set()
    for sid, lid, ref in zip(a["site_id"].astype(str).tolist(), a_lid.tolist(), is_ref, strict=True):
        if ref:
            with_ref.add(sid)
        else:
            crowd_of.setdefault(sid, set()).add(lid)
    # each (site, labeller)'s polygon ids and geometries, in table order
    ids: dict[tuple[str, str], list[str]] = {}
    geoms: dict[tuple[str, str], list] = {}
    shapes = None
    if labels is not None:
        site_ids, lab_ids = labels["site_id"].astype(str).tolist(), labels["labeller_id"].astype(str).tolist()
        keys = zip(site_ids, lab_ids, strict=True)
        pids = labels["polygon_id"].astype(str).tolist()
        shapes = list(labels["geometry"]) if "geometry" in labels else None
        for i, key in enumerate(keys):
            ids.setdefault(key, []).append(pids[i])
            if shapes is not None:
                geoms.setdefault(key, []).append(shapes[i])
    out = []
    for row in sites.sort_values("site_id").itertuples(index=False):
        sid = str(row.site_id)
        crowd = sorted(crowd_of.get(sid, ()))
        if not crowd:
            continue
        lab_polys = {}
        for lid in crowd:
            key = (sid, lid)
            if labels is None:  # read inside the batch
                lab_polys[lid] = (None, None)
            elif key not in ids:
                lab_polys[lid] = ([], [])
            else:  # labels without a geometry column: geometries None, read inside the batch
                lab_polys[lid] = (ids[key], geoms[key] if shapes is not None else None)
        grid = SiteGrid.from_row(row._asdict())
        path = None if labels_path is None else str(labels_path)
        out.append(SiteWork(grid, lab_polys, sid in with_ref or len(crowd) >= 2, labels_path=path))
    return out


def without_geometries(work: list[SiteWork], labels_path: str | Path) -> list[SiteWork]:
    """The same work with its polygons left in ``labels_path`` (ids and geometries read back by
    ``with_geometries`` inside each batch): what Dask tasks are sent, so the graph holds labeller names and
    paths, not the region's polygons nor their ids (at 100x the demo the ids alone made a 16 MiB graph)."""
    return [
        replace(w, labellers={lid: (None, None) for lid in w.labellers}, labels_path=str(labels_path))
        for w in work
    ]


GRAPH_POLYGONS = 10_000  # more polygons than this in one pass: its batches read them themselves


def light_batches(parts: list[list[SiteWork]], labels_path: Path) -> list[list[SiteWork]]:
    """The batches of one pass as Dask tasks get them: with their polygons when they are few (a
    reprocess of a few sites: no reread of the table), else as labeller names and paths, each batch reading
    its own polygons, so the task graph never carries the region's (a full run's was ~11 MiB at 10x)."""
    n = sum(len(g) for b in parts for w in b for _, g in w.labellers.values() if g is not None)
    return [without_geometries(b, labels_path) for b in parts] if n > GRAPH_POLYGONS else parts


def with_geometries(batch: list[SiteWork]) -> list[SiteWork]:
    """``batch`` with every labeller's polygon ids and geometries filled in from its labels table (in table
    order, as ``build_work`` lists them) where the work left them there."""
    need: dict[str, list[str]] = {}
    for w in batch:
        if any(g is None for _, g in w.labellers.values()):
            if w.labels_path is None:
                raise ValueError(f"site {w.site_id}: polygons neither given nor readable (no labels_path)")
            need.setdefault(w.labels_path, []).append(w.site_id)
    if not need:
        return batch
    polygons: dict[tuple[str, str], tuple[list[str], list]] = {}  # (site, labeller) -> (ids, geometries)
    for path, ids in need.items():
        columns = ["polygon_id", "site_id", "labeller_id", "geometry"]
        df = read_label_rows(path, ids, columns)
        for pid, sid, lid, g in zip(*(df[c].astype(str) for c in columns[:3]), df["geometry"], strict=True):
            have = polygons.setdefault((sid, lid), ([], []))
            have[0].append(pid)
            have[1].append(g)
    return [
        replace(
            w,
            labellers={
                lid: (ids, g) if g is not None else polygons.get((w.site_id, lid), ([], []))
                for lid, (ids, g) in w.labellers.items()
            },
        )
        for w in batch
    ]


def site_arrays(w: SiteWork, params: IssueParams):
    """(bins, consensus field mask or None, {labeller: polygon index raster}); footprint = finite consensus"""
    probs = w.probs if w.probs is not None else read_site_probabilities(w.prob_path, w.grid, w.prob_kind)
    try:
        pf = field_probability(probs, f"probabilities of site {w.site_id}", params.prob_tolerance)
    except ValueError as exc:  # from a file: name it, as every bad-input error does
        raise (InputError(w.prob_path, str(exc)) if w.probs is None else exc) from None
    if pf.shape != (w.grid.height, w.grid.width):
        raise ValueError(f"probabilities of site {w.site_id} are {pf.shape}, not the site grid's")
    cons = w.consensus
    if cons is None and w.consensus_path is not None:
        cons = read_site_probabilities(w.consensus_path, w.grid, "consensus")[1]
    if cons is not None:
        pf[~np.isfinite(cons)] = np.nan
    cons_field = None
    if cons is not None and w.consensus_independent:
        cons_field = np.nan_to_num(cons, nan=0.0) >= params.consensus_threshold
    ids, shape = {}, (w.grid.height, w.grid.width)
    for lid, (_, geoms) in w.labellers.items():  # pixel-centre rule; later polygons win on overlaps
        shp = [(g, i + 1) for i, g in enumerate(geoms) if g is not None and not g.is_empty]
        ids[lid] = (
            rasterize(shp, shape, transform=w.grid.affine, dtype="int32")
            if shp
            else np.zeros(shape, np.int32)
        )
    return quantise(pf, params.n_bins), cons_field, ids
