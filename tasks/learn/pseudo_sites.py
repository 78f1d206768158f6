"""The per-site work of the ``pseudo_labels`` stage, a chunk of sites per Dask task.

Three kinds of chunk task, all fanned out together by ``fan_out`` (``tasks.parallel.FanOut``):

* ``evidence_chunk`` (CPU): out-of-sample polygons of threshold sites matched against their targets;
* ``predict_chunk`` (the stage's kind of worker: torch): the final model's probabilities, written as rasters;
* ``vectorise_chunk`` (CPU): a chunk's rasters -> polygons, after its prediction (or for copied rasters).

Each task gets its sites' rows (``site_inputs.chunk_inputs``), not the region's tables, and reads its own
polygons, tiles and rasters. The model loads once per worker through the stage's ``model_loader``
(``tasks.learn.tasks.cached_model``), once per stage without Dask. Results come back in chunk order, so
the stage's tables equal a run site by site in one process. A raster read back is the float32 array that
was written (lossless GeoTIFF), so polygons vectorised from it equal those of the array in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from tasks.learn.inputs import CHUNK, read_prob_raster, write_prob_raster
from tasks.learn.params import LearnParams
from tasks.learn.site_inputs import chunk_inputs, chunks
from tasks.learn.train import configure_threads, predict_sites, release_free_memory
from tasks.learn.vectorise import best_iou, instance_confidence, instances, polygons, target_instances
from tasks.parallel import FanOut, cluster_scheduler
from tasks.store.grid import SiteGrid

FIELD = "field"  # the one polygon class of the three-class (background/interior/boundary) model


def site_polygons(site_id: str, grid: SiteGrid, prob: np.ndarray, params: LearnParams, source: str) -> list:
    ids = instances(prob, params.grow_px, params.min_polygon_px)
    conf = instance_confidence(ids, prob, params.confidence)
    rows = []
    for i, geom in enumerate(polygons(ids, grid)):
        if geom is None:
            continue
        rows.append(
            {
                "polygon_id": f"{site_id}-p{i:04d}",
                "site_id": site_id,
                "class": FIELD,
                "confidence": float(np.clip(conf[i], 0.0, 1.0)),
                "source": source,
                "geometry": geom,
                "crs": grid.crs,
            }
        )
    return rows


def evidence_chunk(inp, site_ids: list[str], oos_dir: str, params: LearnParams) -> tuple[list, dict]:
    """Per out-of-sample polygon of these threshold sites: role, class, confidence, true positive; and
    the number of target polygons per role."""
    rows, n_targets = [], {}
    for site_id in site_ids:
        role = inp.role(site_id)
        prob = read_prob_raster(Path(oos_dir) / f"{site_id}.tif")
        target, _ = inp.target(site_id, params)
        pred = instances(prob, params.grow_px, params.min_polygon_px)
        truth = target_instances(target, params.grow_px, params.min_polygon_px)
        bp, _ = best_iou(pred, truth)
        conf = instance_confidence(pred, prob, params.confidence)
        rows += [
            {"site_id": site_id, "role": role, "class": FIELD, "confidence": c, "tp": b >= params.match_iou}
            for c, b in zip(conf, bp, strict=True)
        ]
        n_targets[role] = n_targets.get(role, 0) + int(truth.max())
    return rows, n_targets


def predict_chunk(
    inp,
    site_ids: list[str],
    ckpt: str,
    mean,
    std,
    params: LearnParams,
    device_type: str,
    loader,
    out_dir: str,
) -> dict:
    """Predict these sites with the checkpoint (``loader(path, device)``) into ``out_dir/<site>.tif``, torch
    on this worker's thread count. Returns the sites predicted, those all nodata/cloud, those without
    imagery, and the thread count."""
    import torch

    threads = configure_threads(params)
    device = torch.device(device_type)
    try:
        model, _ = loader(Path(ckpt), device)
        tiles, no_imagery = [], []
        for s in site_ids:
            px = inp.pixels(s, mean, std)
            (no_imagery.append(s) if px is None else tiles.append(px))
        probs = predict_sites(model, [t.x for t in tiles], [t.valid for t in tiles], params, device)
        for px, prob in zip(tiles, probs, strict=True):
            write_prob_raster(Path(out_dir) / f"{px.site_id}.tif", inp.grids[px.site_id], prob)
        return {
            "sites": [t.site_id for t in tiles],
            "empty": [t.site_id for t in tiles if not t.valid.any()],
            "no_imagery": no_imagery,
            "threads": threads,
        }
    finally:
        release_free_memory()


def vectorise_chunk(sites, grids: dict[str, SiteGrid], sources: dict[str, str], folder: str, params) -> list:
    """Polygons of these sites' rasters in ``folder``; ``sites`` is a list of ids or ``predict_chunk``'s
    result (which also orders this task after that prediction)."""
    ids = sites["sites"] if isinstance(sites, dict) else sites
    rows = []
    for s in ids:
        prob = read_prob_raster(Path(folder) / f"{s}.tif")
        rows += site_polygons(s, grids[s], prob, params, sources[s])
    return rows


@dataclass
class SiteWork:
    """What the stage asks of the per-site tasks and what they give back, in site order."""

    evidence_sites: list[str] = field(default_factory=list)  # threshold sites (empty: thresholds carried)
    copied: list[str] = field(default_factory=list)  # second opinions copied from OOS rasters
    predict: list[str] = field(default_factory=list)  # sites the final model predicts
    evidence: list[dict] = field(default_factory=list)
    n_targets: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)  # polygons: copied sites first, then predicted ones
    empty: list[str] = field(default_factory=list)
    threads: set[int] = field(default_factory=set)


def fan_out(
    work: SiteWork,
    inp,
    sources: dict[str, str],
    oos_dir: Path,
    out_dir: Path,
    ckpt: Path | None,
    mean,
    std,
    params: LearnParams,
    device_type: str,
    loader,
) -> SiteWork:
    """Run every chunk of ``work`` (``CHUNK`` sites a task) in one Dask computation when this runs on a
    Dask worker, else here one after another (the model loaded once); fill in its results."""
    if not (work.evidence_sites or work.copied or work.predict):
        # every site reused: stay in the worker's thread pool, since a seceded task must wait for a free
        # thread to rejoin it, behind whatever a concurrent stage (label_issues) fanned out meanwhile
        return work
    grids = {s: inp.grids[s] for s in work.copied + work.predict}
    with cluster_scheduler() as client:
        run = FanOut(client)
        if client is None:
            loader = lru_cache(maxsize=1)(loader)
        ev = [
            run.cpu(evidence_chunk, chunk_inputs(inp, c), c, str(oos_dir), params)
            for c in chunks(work.evidence_sites, CHUNK)
        ]
        copied = [
            run.cpu(vectorise_chunk, c, _subset(grids, c), _subset(sources, c), str(out_dir), params)
            for c in chunks(work.copied, CHUNK)
        ]
        preds, predicted = [], []
        for c in chunks(work.predict, CHUNK):
            sub = chunk_inputs(inp, c)
            p = run.stage(
                predict_chunk, sub, c, str(ckpt), mean, std, params, device_type, loader, str(out_dir)
            )
            preds.append(p)
            predicted.append(
                run.cpu(vectorise_chunk, p, _subset(grids, c), _subset(sources, c), str(out_dir), params)
            )
        ev, copied, preds, predicted = run.compute(ev, copied, preds, predicted)
    for rows, n in ev:
        work.evidence += rows
        for role, k in n.items():
            work.n_targets[role] = work.n_targets.get(role, 0) + k
    work.rows = [r for part in [*copied, *predicted] for r in part]
    work.empty = [s for p in preds for s in p["empty"]]
    work.threads = {p["threads"] for p in preds}
    return work


def _subset(d: dict, keys: list[str]) -> dict:
    return {k: d[k] for k in keys}
