"""The consensus stage over published artifacts: ingest tables in, consensus artifacts out.

Batches of sites fan out as Dask tasks on the active scheduler (two passes: quality + vote-pattern
counts, then per-site consensus after one pooled EM fit). Each consensus batch writes its sites' rasters
itself, so the caller never holds more than a batch of pixels.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import dask
import geopandas as gpd
import numpy as np
import pandas as pd

from schemas.catalog import Catalog
from tasks.consensus.batch_tasks import (
    concat_frames,
    consensus_chunk,
    first_pass,
    labels_frame,
    unchanged_batches,
)
from tasks.consensus.incremental import (
    INPUTS_STAGE,
    STAGE,
    ConsensusModel,
    carry_model,
    consensus_keys,
    fitted_model,
)
from tasks.consensus.items import item_consensus
from tasks.consensus.params import ConsensusParams
from tasks.consensus.patterns import PATTERN_COLUMNS, empty_site_counts, sum_counts
from tasks.consensus.posterior import SITE_CONSENSUS_COLUMNS
from tasks.consensus.stage import (
    batches,
    fit_pooled_em,
    labeller_quality,
    quality_batch,
)
from tasks.store.artifacts import bytes_hash, read_table, unshare, write_table
from tasks.store.folders import folder_record, previous_record
from tasks.store.reuse import (
    Reuse,
    content_key,
    previous_rows,
    recorded_label_keys,
    reuse_counts,
    write_keys,
)
from tasks.store.stage_result import StageResult


@dataclass
class ConsensusStageResult(StageResult):
    """Artifact records of the consensus stage."""


def params_from_catalog(catalog: Catalog) -> ConsensusParams:
    overrides = dict(catalog.settings.consensus)
    if catalog.settings.label_classes and "class_names" not in overrides:
        overrides["class_names"] = tuple(catalog.settings.label_classes)
    return ConsensusParams(**overrides)


def _uris(catalog: Catalog) -> dict[str, str]:
    ds = catalog.datasets
    return {name: ds[name].uri if name in ds else default for name, default in _URIS.items()}


_URIS = {
    "sites": "sites.parquet",
    "labels": "labels",
    "assignments": "assignments.parquet",
    "item_labels": "item_labels.parquet",
    "assignment_quality": "assignment_quality.parquet",
    "labeller_quality": "labeller_quality.parquet",
    "site_consensus": "site_consensus.parquet",
    "consensus_labels": "consensus_labels",
    "consensus_rasters": "consensus_rasters",
    "item_consensus": "item_consensus.parquet",
    "item_labeller_quality": "item_labeller_quality.parquet",
    "item_confusion": "item_confusion.parquet",
    "consensus_pattern_counts": "consensus_pattern_counts.parquet",
    "consensus_model": "consensus_model.json",
}


def read_consensus_model(version_dir: str | Path | None, uri: str = _URIS["consensus_model"]):
    """The model a version's consensus used (None when it has none this code can read)."""
    if version_dir is None:
        return None
    path = Path(version_dir) / uri
    if not path.exists():
        return None
    return ConsensusModel.from_json(path.read_text(encoding="utf-8"))


def run_consensus_stage(
    catalog: Catalog, version_dir: str | Path, reuse: Reuse | None = None
) -> ConsensusStageResult:
    """Read the ingest artifacts from ``version_dir`` and write the consensus artifacts next to them.

    ``reuse``: the previous version to take unchanged sites' results from (None: compute everything);
    see tasks/consensus/incremental.py for what each site's result is keyed by.
    """
    reuse = reuse or Reuse()
    version_dir = Path(version_dir)
    params = params_from_catalog(catalog)
    batch_size = catalog.settings.ingest.batch_size
    refs = list(catalog.settings.reference_labellers)
    uris = _uris(catalog)
    prev = reuse.previous
    em_method = params.method == "em"
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    sites = read_table(version_dir / uris["sites"])
    done = read_table(version_dir / uris["assignments"], columns=["site_id", "status"])
    labelled = set(done.loc[done["status"] == "completed", "site_id"])
    site_ids = [str(s) for s in sites["site_id"] if s in labelled]
    paths = version_dir / uris["labels"], version_dir / uris["assignments"]
    label_keys = recorded_label_keys(version_dir, done["site_id"], *paths)
    prev_inputs: dict[str, str] = {}
    pass1_outputs = [uris["assignment_quality"]] + ([uris["consensus_pattern_counts"]] if em_method else [])
    if reuse.enabled and prev is not None and all((prev / u).exists() for u in pass1_outputs):
        prev_inputs = {u: k for u, (k, _) in reuse.previous_keys(INPUTS_STAGE).items()}
    timings["load"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    todo_batches, unchanged = unchanged_batches(
        str(version_dir),
        uris,
        sites,
        batches(site_ids, batch_size),
        refs,
        params,
        prev_inputs,
        str(prev) if prev_inputs else None,
        label_keys,
    )
    first = dask.compute(
        *[
            dask.delayed(first_pass)(
                str(version_dir),
                uris,
                ids,
                refs,
                params,
                {s: prev_inputs[s] for s in ids if s in prev_inputs},
                str(prev) if prev_inputs else None,
                None if label_keys is None else {s: label_keys[s] for s in ids},
            )
            for ids in todo_batches
        ]
    ) + ((unchanged,) if unchanged is not None else ())
    input_keys = {s: k for f in first for s, k in f.keys.items()}
    voters = {s: v for f in first for s, v in f.voters.items()}
    reused_inputs = {s for f in first for s in f.reused}
    aq = concat_frames([f.aq for f in first])
    aq = (
        quality_batch([], params)
        if aq is None
        else aq.sort_values(["site_id", "labeller_id"], kind="stable").reset_index(drop=True)
    )
    site_counts = concat_frames([f.counts for f in first])
    site_counts = (
        empty_site_counts()
        if site_counts is None
        else site_counts.sort_values(["site_id", "votes", "zone", "gold"], kind="stable").reset_index(
            drop=True
        )
    )
    del first
    lq = labeller_quality(aq, params)
    em = None
    if em_method and site_ids:
        em = fit_pooled_em(sum_counts([site_counts[PATTERN_COLUMNS]]), lq, params)
        lq = labeller_quality(aq, params, latent=em.latent_frame())
    fitted = fitted_model(em, lq, params)
    model, took_new = fitted, None
    if not reuse.refit and prev is not None:
        model, took_new = carry_model(
            fitted, read_consensus_model(prev, uris["consensus_model"]), params.carry_tolerance
        )
    timings["quality_and_em"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    keys = consensus_keys(input_keys, voters, model, params)
    raster_dir = version_dir / uris["consensus_rasters"]
    labels_dir = version_dir / uris["consensus_labels"]
    for d in (raster_dir, labels_dir):  # a retried attempt starts from nothing
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    reused, prev_rows = _reusable_consensus(reuse, keys, uris)
    model_input = model.em if em_method else model.bayes
    # Canonical chunks of the labelled sites (not of the changed ones): each writes its own
    # consensus_labels parts, so the coarse task never holds the polygons, and a reprocess and a full
    # recompute write the same files.
    chunks = batches(site_ids, batch_size)
    outs = dask.compute(
        *[
            dask.delayed(consensus_chunk)(
                str(version_dir),
                uris,
                k,
                ids,
                [s for s in ids if s not in reused],
                content_key([(s, keys[s]) for s in ids]),
                refs,
                model_input,
                params,
                str(prev) if reused else None,
                None if prev_rows is None else prev_rows[prev_rows["site_id"].isin(ids)],
            )
            for k, ids in enumerate(chunks)
        ]
    )
    site_rows = [o[0] for o in outs]
    parts = sorted(part for o in outs for part in o[1])
    timings["consensus"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    site_consensus = concat_frames(site_rows)
    site_consensus = (
        pd.DataFrame(columns=SITE_CONSENSUS_COLUMNS)
        if site_consensus is None
        else site_consensus[SITE_CONSENSUS_COLUMNS].sort_values("site_id", kind="stable")
    )
    site_consensus = _with_footprints(site_consensus.reset_index(drop=True), sites)
    if parts:
        labels_record = {
            "path": labels_dir.name,
            "rows": sum(n for _, _, n in parts),
            "checksum": bytes_hash(*(h.encode() for _, h, _ in parts)),
        }
    else:
        labels_record = write_table("consensus_labels", labels_frame([]), labels_dir)
    prev_rasters, prev_record = previous_record(prev if reuse.enabled else None, "consensus_rasters")
    artifacts = {
        "assignment_quality": write_table("assignment_quality", aq, version_dir / uris["assignment_quality"]),
        "labeller_quality": write_table("labeller_quality", lq, version_dir / uris["labeller_quality"]),
        "site_consensus": write_table("site_consensus", site_consensus, version_dir / uris["site_consensus"]),
        "consensus_labels": labels_record,
        # rasters linked from the previous version keep the hashes its manifest recorded
        "consensus_rasters": folder_record(
            raster_dir, uris["consensus_rasters"], "*.tif", prev_rasters, prev_record
        ),
        "consensus_pattern_counts": write_table(
            "consensus_pattern_counts", site_counts, version_dir / uris["consensus_pattern_counts"]
        ),
        "consensus_model": _write_model(model, version_dir / uris["consensus_model"]),
        f"reuse_keys/{INPUTS_STAGE}": write_keys(version_dir, INPUTS_STAGE, input_keys, reused_inputs, reuse),
        f"reuse_keys/{STAGE}": write_keys(version_dir, STAGE, keys, reused, reuse),
    }
    item_labels = read_table(version_dir / uris["item_labels"])
    counts = {
        "consensus_sites": len(site_consensus),
        "gold_assignments": len(aq),
        **reuse_counts(STAGE, len(keys), len(reused)),
        "consensus_quality_reused": len(reused_inputs),
    }
    if took_new is not None:
        counts["consensus_values_refitted"] = len(took_new)
    if len(item_labels):
        ic = item_consensus(item_labels, method="ds", reference_labellers=refs)
        artifacts["item_consensus"] = write_table(
            "item_consensus", ic.items, version_dir / uris["item_consensus"]
        )
        artifacts["item_labeller_quality"] = write_table(
            "item_labeller_quality", ic.labellers, version_dir / uris["item_labeller_quality"]
        )
        artifacts["item_confusion"] = write_table(
            "item_confusion", ic.confusion, version_dir / uris["item_confusion"]
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


def _reusable_consensus(
    reuse: Reuse, keys: dict[str, str], uris: dict[str, str]
) -> tuple[set[str], pd.DataFrame | None]:
    """Sites whose consensus key equals the previous version's, and their previous site_consensus rows.

    A site is reused only when the previous version holds its outputs (a row needs its raster)."""
    prev = reuse.previous
    if prev is None or not all(
        (prev / uris[n]).exists() for n in ("site_consensus", "consensus_labels", "consensus_rasters")
    ):
        return set(), None
    reused = reuse.reusable(STAGE, keys)
    rows = previous_rows(reuse, uris["site_consensus"], reused)
    if rows is None or not len(rows):
        return reused, pd.DataFrame(columns=SITE_CONSENSUS_COLUMNS)
    have = np.array([(prev / uris["consensus_rasters"] / f"{s}.tif").exists() for s in rows["site_id"]])
    reused -= set(rows.loc[~have, "site_id"])
    return reused, pd.DataFrame(rows.loc[have]).reset_index(drop=True)


def _write_model(model: ConsensusModel, path: Path) -> dict:
    text = model.to_json()
    unshare(path).write_text(text, encoding="utf-8")
    return {"path": path.name, "rows": model.n_labellers, "checksum": bytes_hash(text.encode())}


def _with_footprints(site_consensus: pd.DataFrame, sites: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    merged = site_consensus.merge(sites[["site_id", "role", "geometry"]], on="site_id", how="left")
    return gpd.GeoDataFrame(merged, geometry="geometry", crs=sites.crs)
