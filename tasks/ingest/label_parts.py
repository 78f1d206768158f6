"""The ``labels`` table written in parts of ``PART_SITES`` sites (``tasks.store.site_parts``), so a reprocess
after a label edit links every part whose sites' raw label inputs are unchanged from the previous version
and normalises, assembles and writes only the parts holding an edited site. Each part is normalised and
written by a Dask task of its own (on a cluster, side by side on its workers): a process holds only the
polygons of the parts it runs (at 100x the demo, one process holding every normalised polygon peaked at
1.9 GiB), and the stage's serial share shrinks (label normalisation was 25 of ingest's 35 s at 10x).

A part's name hashes its sites' raw input keys (``label_input_keys``: raw rows, assignments, grid, classes,
file CRS, label code, geometry library versions), its CRS and the writer's code and library versions, so a
linked part has exactly the bytes a full recompute writes. Parts are per CRS (one GeoParquet file carries
one CRS) and sorted like the polygon ids, so the folder reads back in the order one file per CRS gave.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path

import dask
import dask.base
import dask.threaded
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from tasks.ingest import labels as labels_mod
from tasks.ingest.label_keys import LABELS_STAGE
from tasks.ingest.labels import LABEL_COLUMNS, LabelInputs, _no_labels
from tasks.ingest.raw_label_rows import SpilledRows, SpilledSites
from tasks.store.artifacts import write_table
from tasks.store.errors import InputError
from tasks.store.reuse import Reuse, link_or_copy, site_label_keys
from tasks.store.site_parts import (
    Part,
    native_part_writer,
    parts_record,
    parts_to_write,
    plan_parts,
    previous_site_rows,
    writer_salt,
)

PART_SITES = 64  # ~5k polygons a part at the demo's density: a label edit rewrites ~1/17 of the 10x table
_write_part = native_part_writer("labels")
COUNT_COLUMNS = ["site_id", "labeller_id", "was_valid"]


@dataclass(frozen=True)
class PartJob:
    """One part to write and exactly what it needs: where its sites' raw rows are (spilled: the worker
    reads them; file order, file row numbers as index), its grids and assignments, so no whole-table state
    rides along to the worker that runs it."""

    name: str
    sites: tuple[str, ...]
    raw: SpilledSites
    grids: pd.DataFrame
    assignments: pd.DataFrame
    labels_path: str
    reusable: frozenset[str]  # the part's sites whose previous rows may stand in for a normalisation
    previous_dir: str | None
    uri: str


@dataclass(frozen=True)
class PartDone:
    """What writing one part found: its sites' ``site_label_keys``, the sites whose previous rows it took,
    or the bad input that stopped it."""

    site_keys: dict[str, str]
    taken: frozenset[str]
    error: InputError | None = None


def write_part(job: PartJob, folder: str) -> PartDone:
    """Assemble, write and hash one part: the previous version's rows of its reusable sites, a fresh
    normalisation of the others (a reusable site without rows there is normalised again rather than
    trusted). Bad input comes back as ``error`` instead of raising, so the stage can report the file's
    first bad row whichever task met one first."""
    frames, taken = [], set()
    if job.reusable and job.previous_dir is not None:
        prev = previous_site_rows(Reuse(job.previous_dir), job.uri, job.reusable)
        if prev is not None and len(prev):
            prev = prev[prev["site_id"].astype(str).isin(job.reusable)]
            taken = set(prev["site_id"].astype(str))
            frames.append(pd.DataFrame(prev))
    again = set(job.sites) - taken
    if again:
        raw = job.raw.read()
        raw = raw[raw["site_id"].isin(again)]
        try:
            frames.append(labels_mod.normalise_label_geometry(raw, job.labels_path, job.grids))
        except InputError as exc:
            return PartDone({}, frozenset(), exc)
    rows = assemble(frames or [_no_labels()], job.grids)
    _write_part(rows, Path(folder) / job.name)
    return PartDone(site_label_keys(rows, job.assignments), frozenset(taken))


def _part_scheduler() -> str | None:
    """Where the part tasks run: the active scheduler when it has processes (a cluster), else one after
    another in this process: the work is mostly Python under the GIL, and threads made it slower (100x
    region's labels in one process: 172 s one after another, 218 s on two threads)."""
    return "sync" if dask.base.get_scheduler() in (None, dask.threaded.get) else None


@dataclass
class PreparedLabels:
    """The plan of this run's ``labels`` parts, made before any polygon is normalised: the parts, the
    previous version's folder (whose parts of the same name are linked) and the sites whose previous rows
    stand in for a fresh normalisation (their raw input key is unchanged). :meth:`write` then assembles,
    writes and hashes the other parts, one Dask task each on the active scheduler (the cluster inside the
    stage's task), so no process holds more than its parts' polygons."""

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
        """Write the folder: parts of the previous version linked, the others by :func:`write_part`; then
        its manifest record and the columns every count needs (read back without decoding a polygon).
        The folder is built beside its place and moved there whole: bad input (a polygon with nothing
        left after clipping) raises the file's first bad row and leaves no folder behind."""
        building = folder.with_name(f".{folder.name}.partial")
        shutil.rmtree(building, ignore_errors=True)
        try:
            if self.parts:
                self._write_parts(building)
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

    def _write_parts(self, building: Path) -> None:
        building.mkdir(parents=True)
        todo = parts_to_write(self.parts, self.previous)
        for p in set(self.parts) - set(todo):
            link_or_copy(self.previous / p.name, building / p.name)
        jobs = [
            # the job rides in the task itself (a partial: neither traversed nor tokenized); with spilled
            # rows it is small, so every part is in one graph and a worker takes the next part as soon as
            # it finishes one
            dask.delayed(partial(write_part, self._job(p), str(building)), pure=False)(
                dask_key_name=f"ingest-labels-{p.name}-{uuid.uuid4().hex}"
            )
            for p in todo
        ]
        errors = []
        for done in dask.compute(*jobs, scheduler=_part_scheduler()):
            if done.error is not None:
                errors.append(done.error)
            self.site_keys.update(done.site_keys)
            self.reused |= done.taken
        if errors:
            raise min(errors, key=lambda e: (e.row is None, e.row if e.row is not None else 0))

    def _job(self, part: Part) -> PartJob:
        sites = list(part.sites)
        where = self._assignments_by_site
        own = [where[s] for s in sites if s in where]
        return PartJob(
            part.name,
            part.sites,
            self.inputs.rows.source(sites),
            self._grids_by_site.loc[sites].reset_index(drop=True),
            self.inputs.assignments.iloc[np.sort(np.concatenate(own)) if own else []],
            self.inputs.labels_path,
            frozenset(self.reusable.intersection(sites)),
            self.reuse.previous_dir,
            self.uri,
        )

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
    drawn = inputs.drawn
    crs = dict(zip(grids["site_id"].astype(str), grids["crs"].astype(str), strict=True))
    keys = {s: inputs.keys[s] for s in sorted(drawn)}
    return plan_parts(keys, PART_SITES, {s: crs[s] for s in keys}, _writer_salt(), lambda s: s + "/")


def prepare_labels(inputs: LabelInputs, grids: pd.DataFrame, reuse: Reuse, uri: str) -> PreparedLabels:
    """The plan of ``labels``: its parts, and the sites whose previous rows are reusable (raw input key
    equal to the previous version's). Nothing is normalised here; a part whose name the previous version
    has (every site unchanged) will be linked, and its reusable sites count as reused now (as do reusable
    sites without polygons: nothing to normalise); the others' reuse is settled as :meth:`write` reads
    their rows."""
    if not isinstance(inputs.rows, SpilledRows):  # the part tasks read their rows where they run
        raise TypeError("labels parts need the raw rows spilled: read_label_input_rows(..., spill_to=DIR)")
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
