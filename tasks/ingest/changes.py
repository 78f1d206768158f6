"""Which sites' labels differ between the inputs and the last published version (the label watcher's job).

The inputs are read and checked exactly as ingest does (same readers, same whole-table checks, the published
site grids). Each site's raw label inputs are reduced to the key ingest recorded for them
(``tasks.ingest.label_keys.label_input_keys``); only the sites whose raw key moved are normalised, and their
normalised labels and assignments are compared with the published ones by one content key per site
(``tasks.store.reuse.site_label_keys``): a site whose key differs, appears or disappears has changed.
Without per-polygon geometry work for the unchanged sites, a check costs about a read of the label files,
so the watcher can poll it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from schemas.catalog import Catalog
from tasks.ingest.label_keys import LABELS_STAGE
from tasks.ingest.labels import (
    read_label_input_rows,
    read_label_inputs,
    require_no_pending_polygons,
)
from tasks.ingest.raw_label_rows import LabelFileChanged
from tasks.store.artifacts import read_table
from tasks.store.errors import InputError
from tasks.store.reuse import (
    SITE_LABELS,
    Reuse,
    content_key,
    previous_rows,
    read_keys,
    recorded_label_keys,
    site_label_keys,
)
from tasks.store.versions import VersionStore

READ_ATTEMPTS = 3  # reads of a label file that keeps changing before detection gives up


@dataclass(frozen=True)
class LabelChanges:
    """Sites whose labels changed since ``published_version`` (None: nothing published yet)."""

    published_version: str | None
    changed: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @property
    def sites(self) -> list[str]:
        return sorted({*self.changed, *self.added, *self.removed})

    @property
    def any(self) -> bool:
        return self.published_version is None or bool(self.sites)

    @property
    def fingerprint(self) -> str:
        """Stable id of this change set (the watcher announces each one once)."""
        return content_key(self.published_version, self.changed, self.added, self.removed)


def published_label_keys(
    version_dir: Path, catalog: Catalog, site_ids: Iterable[str] | None = None
) -> dict[str, str]:
    """``site_label_keys`` of the published ``labels`` and ``assignments`` (``site_ids`` only, if given)."""
    ds = catalog.datasets
    stored = read_keys(version_dir, SITE_LABELS)
    paths = version_dir / ds["labels"].uri, version_dir / ds["assignments"].uri
    recorded = recorded_label_keys(version_dir, stored, *paths) if stored else None
    if recorded is not None:  # as ingest recorded them for every site with assignments
        wanted = recorded.keys() if site_ids is None else set(site_ids)
        return {s: recorded[s] for s in sorted(wanted) if s in recorded}
    if site_ids is None:
        labels = read_table(version_dir / ds["labels"].uri)
        assignments = read_table(version_dir / ds["assignments"].uri)
    else:
        ids, published = sorted(set(site_ids)), Reuse(str(version_dir))
        if not ids:
            return {}
        labels = previous_rows(published, ds["labels"].uri, ids)
        assignments = previous_rows(published, ds["assignments"].uri, ids)
        if labels is None or assignments is None:  # a table missing: read it whole, as above (and fail)
            return published_label_keys(version_dir, catalog)
    return site_label_keys(labels, assignments)


def input_label_keys(catalog: Catalog, sites: pd.DataFrame) -> dict[str, str]:
    """Per-site label keys of the catalog's label inputs, normalised on the published ``sites`` grids."""
    grids = _grids(sites)
    assignments, labels = read_label_inputs(catalog, set(sites["site_id"]), grids)
    return site_label_keys(labels, assignments)


def _grids(sites: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(sites[["site_id", "scene_id", "crs", "transform", "width", "height"]])


def detect_label_changes(catalog: Catalog) -> LabelChanges:
    """Compare the label inputs with the latest published version of ``catalog``'s root.

    Every whole-table check of the inputs runs, and each site's raw label inputs are reduced to the key
    ingest recorded for them (``label_input_keys``, ``reuse_keys/ingest_labels``). Only the sites whose
    raw key differs from the published one (or appears or disappears) are normalised and compared with
    the published tables by ``site_label_keys``, so a raw edit that normalises to the published result
    is not a change. A version without raw keys compares every site that way.

    Bad input raises the same ``InputError`` ingest would (file, row, reason): a watcher must not announce
    a change that a refresh would then reject without saying why. The changed sites' rows are read again
    from the file after the keys; a file rewritten in between is read again from the start (a few times,
    then an ``InputError`` asks to try when its writer is done).
    """
    for _ in range(READ_ATTEMPTS):
        try:
            return _detect_label_changes(catalog)
        except LabelFileChanged:
            continue
    raise InputError(
        catalog.input_path("input_labels"),
        f"the file changed during each of {READ_ATTEMPTS} reads; try again when its writer is done",
    )


def _detect_label_changes(catalog: Catalog) -> LabelChanges:
    store = VersionStore(catalog.root_path)
    latest = store.latest_id()
    if latest is None:
        return LabelChanges(None)
    vdir = store.version_path(latest)
    sites = read_table(vdir / catalog.datasets["sites"].uri)
    grids = _grids(sites)
    inputs = read_label_input_rows(catalog, set(sites["site_id"]), grids)
    assignments = inputs.assignments
    recorded = {s: k for s, (k, _) in read_keys(vdir, LABELS_STAGE).items()}
    if recorded:
        candidates = {s for s in inputs.keys if recorded.get(s) != inputs.keys[s]} | (
            recorded.keys() - inputs.keys.keys()
        )
        before = published_label_keys(vdir, catalog, candidates)
    else:
        before = published_label_keys(vdir, catalog)
        candidates = set(inputs.keys) | set(before)
    labels = inputs.normalise(grids, candidates)  # raises what ingest would for these sites' polygons
    require_no_pending_polygons(assignments, inputs.polygon_counts(), inputs.assignments_path)
    after = site_label_keys(labels, assignments[assignments["site_id"].isin(sorted(candidates))])
    return LabelChanges(
        published_version=latest,
        changed=sorted(s for s in after.keys() & before.keys() if after[s] != before[s]),
        added=sorted(after.keys() - before.keys()),
        removed=sorted(before.keys() - after.keys()),
    )
