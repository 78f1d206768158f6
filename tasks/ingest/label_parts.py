"""The ``labels`` table written in parts of ``PART_SITES`` sites (``tasks.store.site_parts``), so a reprocess
after a label edit links every part whose sites' raw label inputs are unchanged from the previous version
and normalises, assembles and writes only the parts holding an edited site.

A part's name hashes its sites' raw input keys (``label_input_keys``: raw rows, assignments, grid, classes,
file CRS, label code, geometry library versions), its CRS and the writer's code and library versions, so a
linked part has exactly the bytes a full recompute writes. Parts are per CRS (one GeoParquet file carries
one CRS) and sorted like the polygon ids, so the folder reads back in the order one file per CRS gave.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from tasks.ingest.label_keys import LABELS_STAGE
from tasks.ingest.labels import LABEL_COLUMNS, LabelInputs, _no_labels
from tasks.store.artifacts import write_table
from tasks.store.reuse import Reuse
from tasks.store.site_parts import (
    Part,
    native_part_writer,
    parts_record,
    parts_to_write,
    plan_parts,
    previous_site_rows,
    write_parts,
    writer_salt,
)

PART_SITES = 64  # ~5k polygons a part at the demo's density: a label edit rewrites ~1/17 of the 10x table
_write_part = native_part_writer("labels")
COUNT_COLUMNS = ["site_id", "labeller_id", "was_valid"]


@dataclass
class PreparedLabels:
    """The ``labels`` parts of this run, worked out before anything is written (bad input raises here, so a
    failed ingest leaves no file behind): the parts, the rows of those to write, the sites whose rows are
    taken over from the previous version, and the rows normalised now."""

    parts: list[Part]
    previous: Path | None
    rows: pd.DataFrame
    reused: set[str]
    fresh: pd.DataFrame
    record: dict = field(default_factory=dict)
    columns: pd.DataFrame | None = None  # (site_id, labeller_id, was_valid) of every row, once written

    def write(self, folder: Path, rel: str, reuse: Reuse) -> None:
        """Write the folder: parts of the previous version linked, the others from ``rows``; then its
        manifest record and the columns every count needs (read back without decoding a polygon)."""
        if self.parts:
            write_parts(folder, self.parts, self.previous, lambda sites: self.rows, _write_part)
        else:  # nobody drew a polygon: one empty part, typed so that it validates
            shutil.rmtree(folder, ignore_errors=True)
            write_table("labels", _no_labels(), folder)
        self.columns = _count_columns(folder)
        prev_dir = reuse.previous if reuse.enabled else None
        self.record = parts_record(folder, rel, prev_dir, "labels", len(self.columns))


def _writer_salt() -> tuple:
    """``site_parts.writer_salt`` (one name to replace where a measurement must run with older code keys)."""
    return writer_salt()


def label_parts(inputs: LabelInputs, grids: pd.DataFrame) -> list[Part]:
    """The parts of the sites that drew polygons, per CRS, in polygon-id order (a site's ids are
    ``<site>/...``, so sites sort by ``site + "/"``)."""
    raw = inputs.labels
    drawn = set(raw["site_id"].astype(str)) if len(raw) else set()
    crs = dict(zip(grids["site_id"].astype(str), grids["crs"].astype(str), strict=True))
    keys = {s: inputs.keys[s] for s in sorted(drawn)}
    return plan_parts(keys, PART_SITES, {s: crs[s] for s in keys}, _writer_salt(), lambda s: s + "/")


def prepare_labels(inputs: LabelInputs, grids: pd.DataFrame, reuse: Reuse, uri: str) -> PreparedLabels:
    """The parts of ``labels``: those whose name the previous version has (every site unchanged; reuse
    on) will be linked; the rows of the others are assembled now from the previous version's rows of
    their reusable sites and the fresh normalisation of the rest. A reusable site without rows there is
    normalised again rather than trusted."""
    previous = reuse.previous / uri if reuse.enabled and reuse.previous is not None else None
    previous = previous if previous is not None and previous.is_dir() else None
    reusable = reuse.reusable(LABELS_STAGE, inputs.keys)
    parts = label_parts(inputs, grids)
    todo = parts_to_write(parts, previous)
    sites = [s for p in todo for s in p.sites]
    taken = {s for p in parts if p not in todo for s in p.sites} & reusable
    frames, fresh = [], _no_labels()
    prev = previous_site_rows(reuse, uri, reusable.intersection(sites))
    if prev is not None and len(prev):
        prev = prev[prev["site_id"].astype(str).isin(reusable)]
        taken.update(prev["site_id"].astype(str))
        frames.append(pd.DataFrame(prev))
    again = set(sites) - taken
    if again or not parts:
        fresh = inputs.normalise(grids, again)
        frames.append(fresh)
    rows = assemble(frames or [fresh], grids)  # no rows to write when every part is linked
    drawn = {s for p in parts for s in p.sites}
    reused = taken | (reusable - drawn)  # a site without polygons has nothing to normalise
    return PreparedLabels(parts, previous, rows, reused, fresh)


def assemble(frames: list[pd.DataFrame], grids: pd.DataFrame) -> pd.DataFrame:
    """Rows of ``labels`` from stored and fresh frames, as one fresh normalisation gives them: this run's
    grid CRS text names each row's CRS (the key covers it; a stored part may spell it differently), text
    columns typed from their values alone, sorted by polygon id."""
    frames = [f for f in frames if len(f)] or frames[-1:]
    labels = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    crs = dict(zip(grids["site_id"], grids["crs"], strict=True))
    labels = pd.DataFrame(labels).assign(crs=labels["site_id"].map(crs))[LABEL_COLUMNS]
    labels = _inferred_text_columns(labels)
    return labels.sort_values("polygon_id", kind="stable").reset_index(drop=True)


def _inferred_text_columns(labels: pd.DataFrame) -> pd.DataFrame:
    """Text columns typed from their values alone (missing as None), as rows built afresh would be: rows
    read back from Parquet and rows just computed then always write the same column types (a column
    of only missing values stays untyped either way)."""
    labels = labels.copy()
    for c in ("polygon_id", "site_id", "labeller_id", "label", "repair_note", "crs"):
        values = labels[c].astype(object)
        labels[c] = pd.Series(values.where(values.notna(), None).tolist(), index=labels.index)
    return labels


def _count_columns(folder: Path) -> pd.DataFrame:
    """(site_id, labeller_id, was_valid) of every row of the folder, without decoding any polygon."""
    frames = [pq.read_table(p, columns=COUNT_COLUMNS).to_pandas() for p in sorted(folder.glob("*.parquet"))]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=bool if c == "was_valid" else object) for c in COUNT_COLUMNS})
    df = pd.concat(frames, ignore_index=True)
    df["was_valid"] = df["was_valid"].astype(bool)
    return df
