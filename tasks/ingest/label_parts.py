"""The ``labels`` table written in parts of ``PART_SITES`` sites (``tasks.store.site_parts``), so a reprocess
after a label edit links every part whose sites' raw label inputs are unchanged from the previous version
and normalises, assembles and writes only the parts holding an edited site. Parts are normalised and
written one at a time: the polygons held at once are one part's (at 100x the demo, one process holding
every normalised polygon peaked at 1.9 GiB).

A part's name hashes its sites' raw input keys (``label_input_keys``: raw rows, assignments, grid, classes,
file CRS, label code, geometry library versions), its CRS and the writer's code and library versions, so a
linked part has exactly the bytes a full recompute writes. Parts are per CRS (one GeoParquet file carries
one CRS) and sorted like the polygon ids, so the folder reads back in the order one file per CRS gave.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from tasks.ingest.label_keys import LABELS_STAGE
from tasks.ingest.labels import LABEL_COLUMNS, LabelInputs, _no_labels
from tasks.store.artifacts import write_table
from tasks.store.reuse import Reuse, site_label_keys
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
    """The plan of this run's ``labels`` parts, made before any polygon is normalised: the parts, the
    previous version's folder (whose parts of the same name are linked) and the sites whose previous rows
    stand in for a fresh normalisation (their raw input key is unchanged). :meth:`write` then assembles,
    writes and hashes one part at a time, so memory holds one part's polygons, not the region's."""

    inputs: LabelInputs
    grids: pd.DataFrame
    parts: list[Part]
    previous: Path | None
    reusable: set[str]
    reuse: Reuse
    uri: str
    reused: set[str] = field(default_factory=set)  # sites whose rows were taken over; complete after write
    site_keys: dict[str, str] = field(default_factory=dict)  # site_label_keys of written parts' sites
    record: dict = field(default_factory=dict)
    columns: pd.DataFrame | None = None  # (site_id, labeller_id, was_valid) of every row, once written

    def write(self, folder: Path, rel: str, reuse: Reuse) -> None:
        """Write the folder: parts of the previous version linked, the others assembled part by part;
        then its manifest record and the columns every count needs (read back without decoding a
        polygon). The folder is built beside its place and moved there whole: a polygon that fails to
        normalise (``InputError``) leaves no folder behind."""
        building = folder.with_name(f".{folder.name}.partial")
        shutil.rmtree(building, ignore_errors=True)
        try:
            if self.parts:
                write_parts(building, self.parts, self.previous, self._part_rows, _write_part, per_part=True)
            else:  # nobody drew a polygon: one empty part, typed so that it validates
                write_table("labels", _no_labels(), building)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        shutil.rmtree(folder, ignore_errors=True)  # unlinks: a file shared with a published version stays
        os.replace(building, folder)
        self.columns = _count_columns(folder)
        prev_dir = reuse.previous if reuse.enabled else None
        self.record = parts_record(folder, rel, prev_dir, "labels", len(self.columns))

    def _part_rows(self, sites: list[str]) -> pd.DataFrame:
        """The rows of one part to write: the previous version's rows of its reusable sites, a fresh
        normalisation of the others (a reusable site without rows there is normalised again rather than
        trusted); their ``site_label_keys`` are kept for the stage's record."""
        grids = self._grids_by_site.loc[list(sites)].reset_index(drop=True)
        frames = []
        prev = previous_site_rows(self.reuse, self.uri, self.reusable.intersection(sites))
        taken: set[str] = set()
        if prev is not None and len(prev):
            prev = prev[prev["site_id"].astype(str).isin(self.reusable)]
            taken = set(prev["site_id"].astype(str))
            frames.append(pd.DataFrame(prev))
        again = set(sites) - taken
        if again:
            frames.append(self.inputs.normalise(grids, again))
        self.reused |= taken
        rows = assemble(frames or [_no_labels()], grids)
        where = self._assignments_by_site
        own = [where[s] for s in sites if s in where]
        a = self.inputs.assignments.iloc[np.sort(np.concatenate(own)) if own else []]
        self.site_keys.update(site_label_keys(rows, a))
        return rows

    @cached_property
    def _grids_by_site(self) -> pd.DataFrame:
        return self.grids.set_index(self.grids["site_id"].astype(str), drop=False)

    @cached_property
    def _assignments_by_site(self) -> dict[str, np.ndarray]:
        a = self.inputs.assignments
        return {str(s): v for s, v in a.groupby(a["site_id"].astype(str), sort=False).indices.items()}


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
    """The plan of ``labels``: its parts, and the sites whose previous rows are reusable (raw input key
    equal to the previous version's). Nothing is normalised here; a part whose name the previous version
    has (every site unchanged) will be linked, and its reusable sites count as reused now (as do reusable
    sites without polygons: nothing to normalise); the others' reuse is settled as :meth:`write` reads
    their rows."""
    previous = reuse.previous / uri if reuse.enabled and reuse.previous is not None else None
    previous = previous if previous is not None and previous.is_dir() else None
    reusable = reuse.reusable(LABELS_STAGE, inputs.keys)
    parts = label_parts(inputs, grids)
    todo = set(parts_to_write(parts, previous))
    linked = {s for p in parts if p not in todo for s in p.sites}
    drawn = {s for p in parts for s in p.sites}
    reused = (linked & reusable) | (reusable - drawn)
    return PreparedLabels(inputs, grids, parts, previous, reusable, reuse, uri, reused)


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
