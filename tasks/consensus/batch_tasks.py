"""The per-batch Dask tasks of the consensus stage: pass 1 (input keys, voters, quality rows and
vote-pattern counts of one batch) and pass 2 (consensus of one chunk of sites; the task writes its rasters
and ``consensus_labels`` parts itself). Each reads only its own sites' rows; unchanged sites' results
come from the previous version."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from tasks.consensus.em import EMModel
from tasks.consensus.incremental import (
    site_input_keys,
)
from tasks.consensus.merge import BayesWeights
from tasks.consensus.params import ConsensusParams
from tasks.consensus.stage import (
    CONSENSUS_LABEL_COLUMNS,
    consensus_batch,
    quality_batch,
    site_inputs,
    site_pattern_counts,
    site_voters,
)
from tasks.memory import releasing_memory
from tasks.store.artifacts import file_hash, read_table, write_table
from tasks.store.grid import SiteGrid
from tasks.store.rasters import write_site_raster
from tasks.store.reuse import (
    Reuse,
    link_or_copy,
    previous_rows,
    site_label_keys,
)
from tasks.store.site_rows import read_site_rows

RASTER_BANDS = ("probability", "risk")


def write_consensus_raster(path: Path, grid: SiteGrid, prob: np.ndarray, risk: np.ndarray) -> None:
    write_site_raster(path, grid, np.stack([prob, risk]), RASTER_BANDS)


def load_tables(version_dir: str, uris: dict[str, str], site_ids: list[str]):
    """The ingest tables of one batch, read inside its own Dask task so no process holds the whole region
    (labels: only the row groups that can hold the batch's sites, streamed; see site_rows.py)."""
    flt = [("site_id", "in", site_ids)]
    sites = read_table(Path(version_dir) / uris["sites"], filters=flt)
    labels = read_site_rows(Path(version_dir) / uris["labels"], site_ids)
    assignments = read_table(Path(version_dir) / uris["assignments"], filters=flt)
    return sites, labels, assignments


def load_batch(version_dir: str, uris: dict[str, str], site_ids: list[str], refs: list[str]) -> list:
    """The SiteInputs of one batch."""
    return list(site_inputs(*load_tables(version_dir, uris, site_ids), refs))


@dataclass
class FirstPass:
    """Pass 1 of one batch: input keys and voters of every site; quality rows and per-site pattern counts,
    computed for changed sites and taken from the previous version for the others."""

    keys: dict[str, str]
    voters: dict[str, tuple[str, ...]]
    reused: list[str]
    aq: pd.DataFrame
    counts: pd.DataFrame


@releasing_memory
def first_pass(
    version_dir: str,
    uris: dict[str, str],
    site_ids: list[str],
    refs: list[str],
    params: ConsensusParams,
    previous_keys: dict[str, str],
    previous_dir: str | None,
    label_keys: dict[str, str] | None = None,
) -> FirstPass:
    """Quality and vote-pattern counts of one batch, in one task: both use (and then release) the batch's
    per-site caches, so running them as two concurrent tasks on shared objects would race.

    ``previous_keys``: input keys of the batch's sites in ``previous_dir`` (empty: recompute all).
    ``label_keys``: the sites' label keys as ingest recorded them (None: computed from their polygons)."""
    flt = [("site_id", "in", site_ids)]
    sites = read_table(Path(version_dir) / uris["sites"], filters=flt)
    assignments = read_table(Path(version_dir) / uris["assignments"], filters=flt)
    labels_path = Path(version_dir) / uris["labels"]
    labels = None
    if label_keys is None:
        labels = read_site_rows(labels_path, site_ids)
        label_keys = site_label_keys(labels, assignments)
    keys = site_input_keys(sites, label_keys, refs, params, site_ids)
    voters = site_voters(assignments, refs)
    voters = {s: voters.get(s, ()) for s in keys}
    reused = sorted(s for s, k in keys.items() if previous_keys.get(s) == k)
    changed = sites[~sites["site_id"].astype(str).isin(reused)]
    todo = []
    if len(changed):
        if labels is None:  # only the changed sites' polygons are read
            labels = read_site_rows(labels_path, sorted(changed["site_id"].astype(str)))
        todo = list(site_inputs(changed, labels, assignments, refs))
    del labels
    aq = [quality_batch(todo, params)]
    counts = [site_pattern_counts(todo, params)] if params.method == "em" else []
    if reused and previous_dir is not None:
        prev = Reuse(previous_dir)
        aq.append(previous_rows(prev, uris["assignment_quality"], reused))
        if params.method == "em":
            counts.append(previous_rows(prev, uris["consensus_pattern_counts"], reused))
    return FirstPass(keys, voters, reused, concat_frames(aq), concat_frames(counts))


def unchanged_batches(
    version_dir: str,
    uris: dict[str, str],
    sites: pd.DataFrame,
    batches: list[list[str]],
    refs: list[str],
    params: ConsensusParams,
    previous_keys: dict[str, str],
    previous_dir: str | None,
    label_keys: dict[str, str] | None,
) -> tuple[list[list[str]], FirstPass | None]:
    """Split pass 1: the batches that have a changed site (for ``first_pass`` tasks), and one FirstPass of
    every other batch's sites made here: their keys equal the previous version's, so their quality rows and
    pattern counts are the previous rows, read in one filtered read per table instead of a task per batch
    (what ``first_pass`` would return for them). Needs the recorded label keys; without them, all batches
    go to tasks."""
    if label_keys is None or not previous_keys or previous_dir is None:
        return batches, None
    ids = [s for b in batches for s in b]
    keys = site_input_keys(sites, {s: label_keys[s] for s in ids if s in label_keys}, refs, params, ids)
    same = {s for s, k in keys.items() if previous_keys.get(s) == k}
    todo = [b for b in batches if not all(s in same for s in b)]
    kept = sorted(s for b in batches if b not in todo for s in b)
    if not kept:
        return batches, None
    assignments = read_table(Path(version_dir) / uris["assignments"], filters=[("site_id", "in", kept)])
    voters = site_voters(assignments, refs)
    prev = Reuse(previous_dir)
    aq = previous_rows(prev, uris["assignment_quality"], kept)
    counts = previous_rows(prev, uris["consensus_pattern_counts"], kept) if params.method == "em" else None
    return todo, FirstPass({s: keys[s] for s in kept}, {s: voters.get(s, ()) for s in kept}, kept, aq, counts)


def concat_frames(frames: list[pd.DataFrame | None]) -> pd.DataFrame | None:
    frames = [f for f in frames if f is not None and len(f)]
    return pd.concat(frames, ignore_index=True) if frames else None


@releasing_memory
def consensus_chunk(
    version_dir: str,
    uris: dict[str, str],
    index: int,
    site_ids: list[str],
    todo: list[str],
    chunk_key: str,
    refs: list[str],
    model,
    params: ConsensusParams,
    previous_dir: str | None,
    previous_sites: pd.DataFrame | None,
) -> tuple[pd.DataFrame | None, list[tuple[str, str, int]]]:
    """Pass 2 of one chunk of sites: consensus of the ``todo`` sites (rasters written here), the others'
    rows and rasters taken from ``previous_dir``; writes the chunk's consensus_labels parts.

    Returns (site_consensus rows, [(part file name, hash, rows)])."""
    vdir = Path(version_dir)
    raster_dir, labels_dir = vdir / uris["consensus_rasters"], vdir / uris["consensus_labels"]
    site_rows, poly_rows = [], []
    if todo:
        batch = load_batch(version_dir, uris, todo, refs)
        grids = {s.site_id: s.grid for s in batch}
        em = model if isinstance(model, EMModel) else None
        res = consensus_batch(batch, em, model if isinstance(model, BayesWeights) else None, params)
        for site_id, (prob, risk) in res.rasters.items():
            write_consensus_raster(raster_dir / f"{site_id}.tif", grids[site_id], prob, risk)
        site_rows.append(res.site_consensus)
        poly_rows.append(plain_labels(res.consensus_labels))
    reused = [s for s in site_ids if s not in set(todo)]
    tag = f"{index:05d}-{chunk_key[:16]}"
    if reused and previous_dir is not None:
        prev = Path(previous_dir)
        if previous_sites is not None and len(previous_sites):
            site_rows.append(previous_sites)
            for sid in previous_sites["site_id"]:
                link_or_copy(prev / uris["consensus_rasters"] / f"{sid}.tif", raster_dir / f"{sid}.tif")
        same = sorted((prev / uris["consensus_labels"]).glob(f"part-*-{tag}.parquet"))
        if not todo and same:  # the previous version wrote this very chunk: share its parts
            parts = []
            for part in same:
                link_or_copy(part, labels_dir / part.name)
                parts.append((part.name, file_hash(part), pq.ParquetFile(part).metadata.num_rows))
            return concat_frames(site_rows), parts
        poly_rows.append(plain_labels(previous_rows(Reuse(previous_dir), uris["consensus_labels"], reused)))
    polys = concat_frames(poly_rows)
    if polys is None:
        return concat_frames(site_rows), []
    polys = polys.sort_values("polygon_id", kind="stable").reset_index(drop=True)
    parts = []
    tmp = labels_dir / f".chunk-{tag}"
    write_table("consensus_labels", polys, tmp)
    for part in sorted(tmp.glob("*.parquet")):
        name = f"{part.name.removesuffix('.parquet')}-{tag}.parquet"
        os.replace(part, labels_dir / name)
        rows = pq.ParquetFile(labels_dir / name).metadata.num_rows
        parts.append((name, file_hash(labels_dir / name), rows))
    tmp.rmdir()
    return concat_frames(site_rows), parts


def labels_frame(rows: list) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=CONSENSUS_LABEL_COLUMNS)


def plain_labels(df: pd.DataFrame | None) -> pd.DataFrame | None:
    """consensus_labels rows as a plain frame (shapely objects, ``crs`` column): parts read from different
    CRS files and fresh GeoDataFrames concatenate without CRS clashes."""
    if df is None or not len(df):
        return None
    out = pd.DataFrame(df)[CONSENSUS_LABEL_COLUMNS].copy()
    out["geometry"] = pd.Series(np.asarray(df["geometry"], dtype=object), index=out.index, dtype=object)
    return out
