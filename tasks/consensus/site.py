"""One site's consensus inputs, bundled so batch functions stay pure and picklable."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd
import shapely
from shapely.geometry.base import BaseGeometry

from tasks.store.grid import SiteGrid

LABEL_COLUMNS = ["polygon_id", "site_id", "labeller_id", "label", "geometry"]
ASSIGNMENT_COLUMNS = ["site_id", "labeller_id", "completed_at", "status", "n_polygons", "is_reference"]


@dataclass
class SiteInput:
    """Everything consensus needs about one site.

    ``labels`` holds the site's polygons in the grid's native CRS (already clipped to the site);
    ``assignments`` holds its assignment rows with ``is_reference`` already resolved (table flag OR catalog
    list). Only ``status == "completed"`` assignments count; a completed assignment without polygons means
    "no fields here".
    """

    grid: SiteGrid
    footprint: BaseGeometry
    labels: pd.DataFrame
    assignments: pd.DataFrame
    role: str | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def site_id(self) -> str:
        return self.grid.site_id

    @cached_property
    def _completed(self) -> pd.DataFrame:
        a = self.assignments
        if a.empty:
            return a
        a = a[a["status"].astype(str) == "completed"].copy()
        a["labeller_id"] = a["labeller_id"].astype(str)
        a["is_reference"] = a["is_reference"].fillna(False).astype(bool)
        # A labeller assigned twice keeps the latest completion (NaT sorts first).
        a = a.sort_values(["completed_at", "labeller_id"], na_position="first", kind="stable")
        return a.drop_duplicates("labeller_id", keep="last")

    @cached_property
    def reference_id(self) -> str | None:
        """The reference labeller of a gold site: earliest completed, ties by id (one reference per site)."""
        ref = self._completed[self._completed["is_reference"]]
        if ref.empty:
            return None
        ref = ref.sort_values(["completed_at", "labeller_id"], na_position="last", kind="stable")
        return str(ref["labeller_id"].iloc[0])

    @property
    def is_gold(self) -> bool:
        return self.reference_id is not None

    @cached_property
    def voters(self) -> tuple[str, ...]:
        """Completed non-reference labellers, sorted by id (sorting makes results permutation-invariant)."""
        c = self._completed
        return tuple(sorted(c.loc[~c["is_reference"], "labeller_id"].astype(str)))

    def completed_at(self, labeller_id: str):
        c = self._completed
        row = c[c["labeller_id"] == labeller_id]
        return row["completed_at"].iloc[0] if len(row) else pd.NaT

    def release(self) -> None:
        """Drop cached rasters and geometries: batch functions call it per site, so memory stays O(batch)."""
        self._cache.clear()

    def polygons(self, labeller_id: str) -> list[tuple[BaseGeometry, str | None]]:
        """(geometry, label) of one labeller, valid, non-empty, sorted by polygon_id for determinism."""
        key = ("poly", labeller_id)
        if key not in self._cache:
            lab = self.labels
            if lab.empty:
                self._cache[key] = []
                return []
            rows = lab[lab["labeller_id"].astype(str) == labeller_id]
            if "polygon_id" in rows.columns:
                rows = rows.sort_values("polygon_id", kind="stable")
            out = []
            labels = rows["label"] if "label" in rows.columns else [None] * len(rows)
            for geom, label in zip(rows["geometry"], labels, strict=True):
                if geom is None or geom.is_empty:
                    continue
                if not geom.is_valid:
                    geom = shapely.make_valid(geom)
                geom = _polygonal(geom)
                if geom is None:
                    continue
                out.append((geom, None if label is None or label != label else str(label)))
            self._cache[key] = out
        return self._cache[key]


def _polygonal(geom: BaseGeometry) -> BaseGeometry | None:
    """Keep only the areal part (make_valid may return collections with lines)."""
    if geom.geom_type in ("Polygon", "MultiPolygon"):
        return geom
    parts = [g for g in shapely.get_parts(geom) if g.geom_type in ("Polygon", "MultiPolygon")]
    if not parts:
        return None
    return shapely.union_all(parts)


def grid_box(grid: SiteGrid) -> BaseGeometry:
    return shapely.box(*grid.bounds)


def empty_labels() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in LABEL_COLUMNS})


def make_site(
    grid: SiteGrid,
    labels: pd.DataFrame | None,
    assignments: pd.DataFrame,
    footprint: BaseGeometry | None = None,
    role: str | None = None,
) -> SiteInput:
    """Convenience constructor (tests, demo): footprint defaults to the grid box."""
    a = assignments.copy()
    if "is_reference" not in a.columns:
        a["is_reference"] = False
    if "completed_at" not in a.columns:
        a["completed_at"] = pd.NaT
    if "n_polygons" not in a.columns:
        a["n_polygons"] = np.nan
    return SiteInput(
        grid=grid,
        footprint=footprint if footprint is not None else grid_box(grid),
        labels=labels if labels is not None else empty_labels(),
        assignments=a,
        role=role,
    )
