"""The consensus stage over published artifacts: ingest tables in, consensus artifacts out.

Batches of sites fan out as Dask tasks on the active scheduler (two passes: quality + vote-pattern
counts, then per-site consensus after one pooled EM fit). Each consensus batch writes its sites' rasters
itself, so the caller never holds more than a batch of pixels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import dask
import geopandas as gpd
import numpy as np
import pandas as pd

from schemas.catalog import Catalog
from tasks.consensus.items import item_consensus
from tasks.consensus.params import ConsensusParams
from tasks.consensus.patterns import sum_counts
from tasks.consensus.stage import (
    batches,
    consensus_batch,
    fit_pooled_em,
    labeller_quality,
    pattern_counts_batch,
    quality_batch,
    site_inputs,
)
from tasks.store.artifacts import bytes_hash, file_hash, read_table, write_table
from tasks.store.grid import SiteGrid
from tasks.store.rasters import write_site_raster
from tasks.store.stage_result import StageResult

RASTER_BANDS = ("probability", "risk")


@dataclass
class ConsensusStageResult(StageResult):
    """Artifact records of the consensus stage."""


def params_from_catalog(catalog: Catalog) -> ConsensusParams:
    overrides = dict(catalog.settings.consensus)
    if catalog.settings.label_classes and "class_names" not in overrides:
        overrides["class_names"] = tuple(catalog.settings.label_classes)
    return ConsensusParams(**overrides)


def write_consensus_raster(path: Path, grid: SiteGrid, prob: np.ndarray, risk: np.ndarray) -> None:
    write_site_raster(path, grid, np.stack([prob, risk]), RASTER_BANDS)


def _load_batch(version_dir: str, uris: dict[str, str], site_ids: list[str], refs: list[str]) -> list:
    """The SiteInputs of one batch, read inside its own Dask task so no process holds the whole region."""
    flt = [("site_id", "in", site_ids)]
    sites = read_table(Path(version_dir) / uris["sites"], filters=flt)
    labels = read_table(Path(version_dir) / uris["labels"], filters=flt)
    assignments = read_table(Path(version_dir) / uris["assignments"], filters=flt)
    return list(site_inputs(sites, labels, assignments, refs))


def _first_pass(batch, params: ConsensusParams) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Quality and vote-pattern counts of one batch, in one task: both use (and then release) the batch's
    per-site caches, so running them as two concurrent tasks on shared objects would race."""
    aq = quality_batch(batch, params)
    counts = pattern_counts_batch(batch, params) if params.method == "em" else None
    return aq, counts


def _consensus_and_write(batch, model, lq, params, raster_dir: str) -> tuple[pd.DataFrame, gpd.GeoDataFrame]:
    grids = {s.site_id: s.grid for s in batch}
    res = consensus_batch(batch, model, lq, params)
    for site_id, (prob, risk) in res.rasters.items():
        write_consensus_raster(Path(raster_dir) / f"{site_id}.tif", grids[site_id], prob, risk)
    return res.site_consensus, res.consensus_labels


def run_consensus_stage(catalog: Catalog, version_dir: str | Path) -> ConsensusStageResult:
    """Read the ingest artifacts from ``version_dir`` and write the consensus artifacts next to them."""
    version_dir = Path(version_dir)
    ds = catalog.datasets
    params = params_from_catalog(catalog)
    batch_size = catalog.settings.ingest.batch_size
    refs = list(catalog.settings.reference_labellers)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    sites = read_table(version_dir / ds["sites"].uri)
    done = read_table(version_dir / ds["assignments"].uri, columns=["site_id", "status"])
    labelled = set(done.loc[done["status"] == "completed", "site_id"])
    site_ids = [s for s in sites["site_id"] if s in labelled]
    uris = {name: ds[name].uri for name in ("sites", "labels", "assignments")}
    parts = [
        dask.delayed(_load_batch)(str(version_dir), uris, ids, refs) for ids in batches(site_ids, batch_size)
    ]
    timings["load"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    first = dask.compute(*[dask.delayed(_first_pass)(b, params) for b in parts])
    aq_parts = [f[0] for f in first]
    count_parts = [f[1] for f in first if f[1] is not None]
    aq = pd.concat(aq_parts, ignore_index=True) if aq_parts else quality_batch([], params)
    lq = labeller_quality(aq, params)
    model = None
    if params.method == "em" and count_parts:
        model = fit_pooled_em(sum_counts(list(count_parts)), lq, params)
        lq = labeller_quality(aq, params, latent=model.latent_frame())
    timings["quality_and_em"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    raster_dir = version_dir / ds["consensus_rasters"].uri
    raster_dir.mkdir(parents=True, exist_ok=True)
    outs = dask.compute(
        *[dask.delayed(_consensus_and_write)(b, model, lq, params, str(raster_dir)) for b in parts]
    )
    site_rows = [o[0] for o in outs if len(o[0])]
    poly_rows = [o[1] for o in outs if len(o[1])]
    timings["consensus"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    site_consensus = _with_footprints(
        pd.concat(site_rows, ignore_index=True) if site_rows else pd.DataFrame(columns=["site_id"]), sites
    )
    consensus_labels = (
        pd.concat(poly_rows, ignore_index=True)
        if poly_rows
        else pd.DataFrame(columns=["site_id", "crs", "geometry"])
    )
    artifacts = {
        "assignment_quality": write_table(
            "assignment_quality", aq, version_dir / ds["assignment_quality"].uri
        ),
        "labeller_quality": write_table("labeller_quality", lq, version_dir / ds["labeller_quality"].uri),
        "site_consensus": write_table(
            "site_consensus", site_consensus, version_dir / ds["site_consensus"].uri
        ),
        "consensus_labels": write_table(
            "consensus_labels", consensus_labels, version_dir / ds["consensus_labels"].uri
        ),
        "consensus_rasters": {
            "path": ds["consensus_rasters"].uri,
            "rows": len(list(raster_dir.glob("*.tif"))),
            "checksum": bytes_hash(*(file_hash(p).encode() for p in sorted(raster_dir.glob("*.tif")))),
        },
    }
    item_labels = read_table(version_dir / ds["item_labels"].uri)
    counts = {"consensus_sites": len(site_consensus), "gold_assignments": len(aq)}
    if len(item_labels):
        ic = item_consensus(item_labels, method="ds", reference_labellers=refs)
        artifacts["item_consensus"] = write_table(
            "item_consensus", ic.items, version_dir / ds["item_consensus"].uri
        )
        artifacts["item_labeller_quality"] = write_table(
            "item_labeller_quality", ic.labellers, version_dir / ds["item_labeller_quality"].uri
        )
        artifacts["item_confusion"] = write_table(
            "item_confusion", ic.confusion, version_dir / ds["item_confusion"].uri
        )
        counts["items"] = len(ic.items)
    timings["write"] = time.perf_counter() - t3
    notes = []
    no_gold = lq.loc[lq["n_gold"] == 0, "labeller_id"].tolist() if "n_gold" in lq else []
    if no_gold:
        notes.append(
            f"labellers without gold tasks (quality from the EM only): {', '.join(map(str, no_gold))}"
        )
    return ConsensusStageResult(artifacts, timings, counts, notes)


def _with_footprints(site_consensus: pd.DataFrame, sites: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    merged = site_consensus.merge(sites[["site_id", "role", "geometry"]], on="site_id", how="left")
    return gpd.GeoDataFrame(merged, geometry="geometry", crs=sites.crs)
