"""A chunk of sites' inputs, for the Dask tasks a learn stage fans out per chunk of sites.

``Inputs`` covers the whole region and loads the whole ``labels`` table (67k polygons at 10x the demo) the
first time a target needs polygons: too much to ship to every inner task, and too slow to read in each.
``chunk_inputs`` cuts it down to a chunk's sites (their rows of ``sites`` and ``assignments``, grids,
scene paths) and the task reads only those sites' polygons itself, from the row groups that can hold
them (``tasks.store.site_rows.read_site_rows``). A chunk's ``pixels`` and ``target`` equal the whole
region's for the same site: ``site_labels`` groups the same rows in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from tasks.learn.inputs import Inputs
from tasks.store.artifacts import read_table
from tasks.store.site_rows import read_site_rows


class ChunkInputs(Inputs):
    """``Inputs`` over a few sites whose ``labels`` are only those sites' rows, read on first use."""

    @property
    def labels(self) -> pd.DataFrame:
        if self._labels is None:
            self._labels = read_label_rows(self.labels_path, list(self.sites["site_id"]))
        return self._labels


def read_label_rows(path: Path, site_ids: list[str], columns: list[str] | None = None) -> pd.DataFrame:
    """The ``labels`` rows of ``site_ids``, in table order (a native-CRS folder, or one file); ``columns``:
    only those (name the geometry)."""
    path = Path(path)
    if path.is_dir():
        return read_site_rows(path, site_ids, columns)
    return read_table(path, columns=columns, filters=[("site_id", "in", sorted(set(site_ids)))])


def chunk_inputs(inp: Inputs, site_ids: Sequence[str]) -> ChunkInputs:
    """``inp`` cut down to ``site_ids``: a few kB to ship, whatever the region's size."""
    ids = set(site_ids)
    sites = inp.sites[inp.sites["site_id"].isin(ids)].reset_index(drop=True)
    scene_ids = set(sites["scene_id"].astype(str))
    return ChunkInputs(
        sites=sites,
        grids={s: inp.grids[s] for s in sites["site_id"]},
        scenes={k: v for k, v in inp.scenes.items() if k in scene_ids},
        mean=inp.mean,
        std=inp.std,
        band_names=inp.band_names,
        consensus_dir=inp.consensus_dir,
        cloud_threshold=inp.cloud_threshold,
        version_dir=inp.version_dir,
        assignments=inp.assignments[inp.assignments["site_id"].isin(ids)].reset_index(drop=True),
        labels_path=inp.labels_path,
        reference_labellers=inp.reference_labellers,
    )


def chunks(site_ids: Sequence[str], size: int) -> list[list[str]]:
    """``site_ids`` in order, ``size`` at a time (neighbouring sites share the labels' row groups)."""
    return [list(site_ids[i : i + size]) for i in range(0, len(site_ids), size)]
