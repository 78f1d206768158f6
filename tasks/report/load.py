"""Read a version's published artifacts for the report, defensively.

The report only reads artifacts (never another stage's code). Core tables must exist; artifacts built by
stages that may not have run (label issues, pseudo-labels) are optional: a missing one is recorded so
the page can say which artifact is absent instead of failing.
"""

from __future__ import annotations

import glob
from pathlib import Path

import pandas as pd
import pyarrow as pa

from schemas.catalog import Catalog
from tasks.store.artifacts import read_attributes, read_table

# Where an artifact lives when the catalog has no entry for it yet (stages land in parallel).
DEFAULT_URIS = {
    "label_issues": "label_issues.parquet",
    "assignment_issues": "assignment_issues.parquet",
    "pseudo_labels": "pseudo_labels",
    "pseudo_label_thresholds": "pseudo_label_thresholds.parquet",
    "pseudo_probabilities": "pseudo_probabilities",
}
OPTIONAL = frozenset(DEFAULT_URIS) | {
    "item_labels",
    "item_consensus",
    "item_labeller_quality",
    "item_confusion",
}

# Per-row detail the report never shows (label_issues' JSON evidence: ~70 % of that table's memory);
# ``Artifacts.attributes`` leaves it unread, ``site_rows`` still reads it for the few sites drawn.
DETAIL_COLUMNS = ("evidence",)


class Artifacts:
    """Lazy, cached access to one version folder's tables by catalog name."""

    def __init__(self, catalog: Catalog, version_dir: str | Path):
        self.catalog = catalog
        self.dir = Path(version_dir)
        self._cache: dict[str, pd.DataFrame | None] = {}
        self.missing: list[str] = []
        self.unreadable: dict[str, str] = {}

    def path(self, name: str) -> Path:
        ds = self.catalog.datasets.get(name)
        uri = ds.uri if ds is not None else DEFAULT_URIS.get(name, f"{name}.parquet")
        p = self.dir / uri
        if not p.exists() and p.suffix == "" and p.with_suffix(".parquet").exists():
            return p.with_suffix(".parquet")  # a folder-or-file artifact written as one file
        if not p.exists() and p.suffix == ".parquet" and p.with_suffix("").is_dir():
            return p.with_suffix("")
        return p

    def exists(self, name: str) -> bool:
        p = self.path(name)
        return p.is_file() or (p.is_dir() and any(p.iterdir()))

    def table(self, name: str) -> pd.DataFrame | None:
        """The table, or None when an optional artifact is absent or unreadable (recorded in ``missing``)."""
        if name in self._cache:
            return self._cache[name]
        df = None
        if not self.exists(name):
            if name not in OPTIONAL:
                raise FileNotFoundError(f"{self.path(name)}: artifact {name!r} is required by the report")
            self.missing.append(name)
        else:
            try:
                df = read_table(self.path(name))
            except (
                Exception
            ) as exc:  # an optional artifact in a shape we cannot read must not sink the report
                if name not in OPTIONAL:
                    raise
                self.unreadable[name] = f"{type(exc).__name__}: {exc}"
                self.missing.append(name)
        self._cache[name] = df
        return df

    def attributes(self, name: str) -> pd.DataFrame | None:
        """The table without its geometry (for aggregates; decoding every polygon is most of a read) and
        without ``DETAIL_COLUMNS``, in ``table``'s row order; ``table`` when it is already loaded or has no
        geometry."""
        if name in self._cache:
            return self._cache[name]
        key = f"{name}#attributes"
        if key in self._cache:
            return self._cache[key]
        if not self.exists(name):
            return self.table(name)  # None (recorded missing) or the error of a required artifact
        try:
            df = read_attributes(self.path(name), exclude=DETAIL_COLUMNS)
        except Exception:  # noqa: BLE001 - let ``table`` record (or raise) what is wrong with it
            return self.table(name)
        if df is None:
            return self.table(name)
        self._cache[key] = df
        return df

    def site_rows(self, name: str, site_ids) -> pd.DataFrame | None:
        """Every column (geometry included) of the rows of ``site_ids`` (a Parquet filter, so only those
        polygons are decoded); None when the artifact is absent."""
        ids = sorted({str(s) for s in site_ids})
        if name in self._cache:
            df = self._cache[name]
            return None if df is None else df[df["site_id"].astype(str).isin(ids)]
        attrs = self.attributes(name)
        if attrs is None:
            return None
        if not ids or "site_id" not in attrs:
            return self.table(name) if "site_id" not in attrs else attrs.iloc[:0]
        try:
            return read_table(self.path(name), filters=[("site_id", "in", ids)])
        except (pa.ArrowTypeError, pa.ArrowNotImplementedError):  # an empty part with untyped columns
            df = self.table(name)
            return df[df["site_id"].astype(str).isin(ids)]

    def raster_path(self, folder: str, site_id: str) -> Path | None:
        """``<folder artifact>/<site_id>.tif`` when present (consensus rasters, pseudo probabilities)."""
        p = self.path(folder) / f"{site_id}.tif"
        return p if p.is_file() else None


def scene_paths(catalog: Catalog) -> dict[str, str]:
    """Scene id (file stem) → imagery path, from the catalog's imagery glob; empty when inputs are gone."""
    pattern = catalog.input_path("imagery")
    paths = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
    return {Path(p).stem: p for p in paths if Path(p).is_file()}


def first_column(df: pd.DataFrame, *names: str) -> str | None:
    """The first of ``names`` that ``df`` has; lets the report follow schemas that are still settling."""
    return next((n for n in names if n in df.columns), None)
