"""The ``pseudo_labels`` table in parts of ``PART_SITES`` sites (``tasks.store.site_parts``): a reprocess
links every part whose sites' unit keys and the threshold in use are unchanged, and reads and writes only
the parts holding a recomputed site.

A part's name hashes its sites' unit keys (what their probabilities come from, parameters, code), the
threshold (it sets ``kept``), its CRS and the writer's code and versions, so a linked part has exactly the
bytes a full recompute writes. Parts are per CRS and sorted like the polygon ids (``<site>-p<n>``), so the
folder reads back in the order one file per CRS gave.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.store.artifacts import write_table
from tasks.store.reuse import Reuse
from tasks.store.site_parts import (
    native_part_writer,
    parts_record,
    plan_parts,
    previous_site_rows,
    write_parts,
    writer_salt,
)

PART_SITES = 64
POLYGON_COLUMNS = ["polygon_id", "site_id", "class", "confidence", "source", "kept", "geometry", "crs"]
ROW_COLUMNS = [c for c in POLYGON_COLUMNS if c != "kept"]
TABLE = "pseudo_labels"
_write_part = native_part_writer(TABLE)


@dataclass
class WrittenPseudo:
    record: dict
    rows: int
    kept: int


def assemble(frames: list[pd.DataFrame], threshold: float) -> pd.DataFrame:
    """``pseudo_labels`` rows from stored and fresh frames (``ROW_COLUMNS``): typed, ``kept`` from the
    threshold in use, sorted by polygon id."""
    frames = [f[ROW_COLUMNS] for f in frames]
    parts = [f for f in frames if len(f)]
    labels = pd.concat(parts, ignore_index=True) if parts else frames[-1].copy()
    labels["confidence"] = labels["confidence"].astype(float)  # typed even without rows
    for c in ("polygon_id", "site_id", "class", "source", "crs"):  # (an empty table's filters need types)
        labels[c] = labels[c].astype(str)
    labels["kept"] = labels["confidence"].to_numpy() >= threshold
    return labels[POLYGON_COLUMNS].sort_values("polygon_id", kind="stable").reset_index(drop=True)


def write_pseudo_labels(
    folder: Path,
    keys: Mapping[str, str],
    crs: Mapping[str, str],
    fresh: pd.DataFrame,
    reused: set[str],
    threshold: float,
    reuse: Reuse,
    uri: str,
) -> WrittenPseudo:
    """Write the folder for the units ``keys`` (site -> unit key; ``crs``: site -> its grid's CRS).

    ``fresh``: rows computed now (``ROW_COLUMNS``); ``reused``: the sites whose rows are the previous
    version's. A part the previous version has (same name) is linked; the others are assembled from
    ``fresh`` and the previous rows of their reused sites.
    """
    previous = reuse.previous / uri if reuse.enabled and reuse.previous is not None else None
    parts = plan_parts(keys, PART_SITES, crs, (writer_salt(), float(threshold)), lambda s: s + "-")

    def rows(sites: list[str]) -> pd.DataFrame:
        frames = [fresh[fresh["site_id"].isin(sites)]]
        old = previous_site_rows(reuse, uri, reused.intersection(sites))
        if old is not None and len(old):
            frames.insert(0, old.assign(crs=[crs[s] for s in old["site_id"]]))
        return assemble(frames, threshold)

    write_parts(
        folder, parts, previous if previous is not None and previous.is_dir() else None, rows, _write_part
    )
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not files:  # no polygon anywhere: one empty part, typed so that it validates
        shutil.rmtree(folder, ignore_errors=True)
        write_table(TABLE, assemble([fresh.iloc[:0]], threshold), folder)
        files = sorted(folder.glob("*.parquet"))
    kept = [pq.read_table(p, columns=["kept"])["kept"] for p in files]
    n_rows = sum(len(k) for k in kept)
    n_kept = sum(int(pc.sum(k).as_py() or 0) for k in kept if len(k))
    prev_dir = reuse.previous if reuse.enabled else None
    return WrittenPseudo(parts_record(folder, folder.name, prev_dir, TABLE, n_rows), n_rows, n_kept)
