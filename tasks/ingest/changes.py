"""Which sites' labels differ between the inputs and the last published version (the label watcher's job).

The inputs are normalised exactly as ingest does (same readers, same repairs, the published site grids), and
each site's normalised labels and assignments are reduced to one content key
(``tasks.store.reuse.site_label_keys``) on both sides; a site whose key differs, appears or disappears has
changed. Reading and normalising the label files is vectorised and cheap next to a refresh, so the watcher
can poll it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from schemas.catalog import Catalog
from tasks.ingest.labels import read_label_inputs
from tasks.store.artifacts import read_table
from tasks.store.reuse import content_key, site_label_keys
from tasks.store.versions import VersionStore


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


def published_label_keys(version_dir: Path, catalog: Catalog) -> dict[str, str]:
    ds = catalog.datasets
    labels = read_table(version_dir / ds["labels"].uri)
    assignments = read_table(version_dir / ds["assignments"].uri)
    return site_label_keys(labels, assignments)


def input_label_keys(catalog: Catalog, sites: pd.DataFrame) -> dict[str, str]:
    """Per-site label keys of the catalog's label inputs, normalised on the published ``sites`` grids."""
    grids = pd.DataFrame(sites[["site_id", "scene_id", "crs", "transform", "width", "height"]])
    assignments, labels = read_label_inputs(catalog, set(sites["site_id"]), grids)
    return site_label_keys(labels, assignments)


def detect_label_changes(catalog: Catalog) -> LabelChanges:
    """Compare the label inputs with the latest published version of ``catalog``'s root.

    Bad input raises the same ``InputError`` ingest would (file, row, reason): a watcher must not announce
    a change that a refresh would then reject without saying why.
    """
    store = VersionStore(catalog.root_path)
    latest = store.latest_id()
    if latest is None:
        return LabelChanges(None)
    vdir = store.version_path(latest)
    sites = read_table(vdir / catalog.datasets["sites"].uri)
    before = published_label_keys(vdir, catalog)
    after = input_label_keys(catalog, sites)
    return LabelChanges(
        published_version=latest,
        changed=sorted(s for s in after.keys() & before.keys() if after[s] != before[s]),
        added=sorted(after.keys() - before.keys()),
        removed=sorted(before.keys() - after.keys()),
    )
