"""Sites, assignments, label polygons and item labels → validated, normalised tables.

Label polygons are reprojected into their site's native CRS, repaired with ``make_valid`` (and the
repair recorded), split into single polygons and clipped to the site footprint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from shapely.geometry import box

from schemas.catalog import Catalog
from tasks.ingest.label_keys import LabelRowDigests, label_input_keys, row_wkb
from tasks.ingest.raw_label_rows import FileRows, SpilledRows
from tasks.ingest.readers import (
    iter_vector_batches,
    read_table_file,
    require_columns,
    require_ids,
    require_unique,
)
from tasks.store.errors import InputError

LABEL_COLUMNS = [
    "polygon_id",
    "site_id",
    "labeller_id",
    "label",
    "area_m2",
    "was_valid",
    "repair_note",
    "geometry",
    "crs",
]


def require_polygons(gdf: gpd.GeoDataFrame, path, empty_reason: str, other_reason: str) -> None:
    """Every geometry is a non-empty (Multi)Polygon; name the first row that is not (``other_reason``
    gets its geometry type)."""
    geom = gdf.geometry
    empty = geom.isna() | geom.is_empty
    if empty.any():
        raise InputError(path, empty_reason, row=gdf.index[empty.to_numpy()][0])
    polygonal = geom.geom_type.isin(["Polygon", "MultiPolygon"])
    if not polygonal.all():
        row = gdf.index[~polygonal.to_numpy()][0]
        raise InputError(path, other_reason.format(geom.loc[row].geom_type), row=row)


def normalise_sites(gdf: gpd.GeoDataFrame, path: str) -> gpd.GeoDataFrame:
    """Check ids and footprints; return site_id + geometry in EPSG:4326 (row numbers kept as index)."""
    require_columns(gdf, ["site_id"], path)
    require_ids(gdf, ["site_id"], path)
    require_unique(gdf, ["site_id"], path)
    require_polygons(gdf, path, "empty or missing footprint geometry", "footprint is a {}, not a polygon")
    out = gpd.GeoDataFrame(
        {"site_id": gdf["site_id"].astype(str)}, geometry=gdf.geometry.make_valid(), crs=gdf.crs
    )
    return out.to_crs(4326)


def normalise_assignments(
    df: pd.DataFrame, path: str, site_ids: set[str], reference: set[str]
) -> pd.DataFrame:
    """Parse completion times; an assignment without ``completed_at`` is pending (not labelled).

    A file without a ``completed_at`` column at all means every assignment is complete.
    """
    require_columns(df, ["site_id", "labeller_id"], path)
    require_ids(df, ["site_id", "labeller_id"], path)
    require_unique(df, ["site_id", "labeller_id"], path)
    unknown = ~df["site_id"].isin(site_ids)
    if unknown.any():
        row = df.index[unknown.to_numpy()][0]
        raise InputError(path, f"unknown site_id {df.at[row, 'site_id']!r} (not in the sites file)", row=row)
    if "completed_at" in df.columns:
        raw = df["completed_at"]
        parsed = pd.to_datetime(raw, utc=True, errors="coerce", format="ISO8601")
        bad = raw.notna() & parsed.isna()
        if bad.any():
            row = df.index[bad.to_numpy()][0]
            raise InputError(path, f"completed_at {raw.loc[row]!r} is not an ISO-8601 time", row=row)
        completed = parsed.notna()
    else:
        parsed = pd.Series(pd.NaT, index=df.index, dtype="datetime64[us, UTC]")
        completed = pd.Series(True, index=df.index)
    return pd.DataFrame(
        {
            "site_id": df["site_id"].to_numpy(),
            "labeller_id": df["labeller_id"].to_numpy(),
            "completed_at": parsed.astype("datetime64[us, UTC]"),  # a Series: keeps UTC when all NaT
            "status": np.where(completed, "completed", "pending"),
            "is_reference": df["labeller_id"].isin(reference).to_numpy(),
        },
        index=df.index,
    )


def normalise_labels(
    gdf: gpd.GeoDataFrame,
    path: str,
    grids: pd.DataFrame,
    assignments: pd.DataFrame,
    classes: list[str],
) -> pd.DataFrame:
    """Validate, reproject, repair and clip label polygons; one output row per single polygon.

    ``grids`` has one row per site: site_id, crs, transform, width, height (the site's pixel grid).
    """
    return normalise_label_geometry(validate_labels(gdf, path, grids, assignments, classes), path, grids)


def validate_labels(
    gdf: gpd.GeoDataFrame,
    path: str,
    grids: pd.DataFrame,
    assignments: pd.DataFrame,
    classes: list[str],
) -> gpd.GeoDataFrame:
    """The checks that look at label rows alone (vectorised, cheap): ids, classes, known sites, an
    assignment behind every polygon, polygonal geometry. Returns ``gdf`` with a ``label`` column (None
    where missing), ready for :func:`normalise_label_geometry`."""
    return label_checks(path, grids, assignments, classes)(gdf)


def label_checks(
    path: str, grids: pd.DataFrame, assignments: pd.DataFrame, classes: list[str]
) -> Callable[[gpd.GeoDataFrame], gpd.GeoDataFrame]:
    """:func:`validate_labels` for one file read in batches: what rows are checked against (known sites,
    assigned (site, labeller) pairs) is built once, not per batch."""
    known_sites = set(grids["site_id"].astype(str))
    assigned = set(
        zip(assignments["site_id"].astype(str), assignments["labeller_id"].astype(str), strict=True)
    )

    def check(gdf: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
        if len(gdf) == 0:  # a file without features (an empty GeoJSON carries no columns at all)
            return gdf
        require_columns(gdf, ["site_id", "labeller_id"], path)
        require_ids(gdf, ["site_id", "labeller_id"], path)
        if "label" not in gdf.columns:
            gdf = gdf.assign(label=None)
        label = gdf["label"].where(gdf["label"].notna(), None)
        if classes:
            bad = label.notna() & ~label.isin(classes)
            if bad.any():
                row = gdf.index[bad.to_numpy()][0]
                raise InputError(path, f"unknown class {label.loc[row]!r}; allowed: {classes}", row=row)
        # ids as Python text: a set lookup each, not pandas' isin over Arrow text (which converts every
        # value of the set to an Arrow scalar on each call)
        sites = gdf["site_id"].to_numpy(dtype=object)
        who = gdf["labeller_id"].to_numpy(dtype=object)
        unknown = np.fromiter((s not in known_sites for s in sites), bool, len(sites))
        if unknown.any():
            row = gdf.index[unknown][0]
            raise InputError(path, f"label for unknown site_id {gdf.at[row, 'site_id']!r}", row=row)
        unassigned = np.fromiter((k not in assigned for k in zip(sites, who, strict=True)), bool, len(sites))
        if unassigned.any():
            row = gdf.index[unassigned][0]
            lid, sid = gdf.at[row, "labeller_id"], gdf.at[row, "site_id"]
            raise InputError(path, f"labeller {lid!r} has no assignment for site {sid!r}", row=row)
        require_polygons(gdf, path, "empty or missing geometry", "geometry is a {}; labels must be polygons")
        return gdf.assign(label=label)

    return check


def normalise_label_geometry(gdf: gpd.GeoDataFrame, path: str, grids: pd.DataFrame) -> pd.DataFrame:
    """Reproject, repair and clip validated label rows (:func:`validate_labels`) on their sites' grids.

    Each row's result depends only on that row, its site's grid and the rows of the same site and
    labeller before it in the file (they number its polygons), so normalising any subset of whole
    sites gives exactly those sites' rows of a normalisation of the whole table.
    """
    if len(gdf) == 0:
        return _no_labels()
    out = []
    grids = grids.set_index("site_id")
    for crs, site_ids in grids.groupby("crs").groups.items():
        part = gdf[gdf["site_id"].isin(site_ids)]
        if part.empty:
            continue
        part = part.to_crs(crs)
        out.append(_repair_and_clip(part, path, grids, crs, part["label"]))
    if not out:
        return _no_labels()
    return pd.concat(out, ignore_index=True)[LABEL_COLUMNS]


def _no_labels() -> pd.DataFrame:
    """The labels table without rows, typed so that it validates (nobody drew a polygon yet)."""
    dtypes = {"area_m2": float, "was_valid": bool}
    return pd.DataFrame({c: pd.Series(dtype=dtypes.get(c, object)) for c in LABEL_COLUMNS})


def _repair_and_clip(part, path, grids, crs, label) -> pd.DataFrame:
    geoms = part.geometry.to_numpy()
    valid = shapely.is_valid(geoms)
    reasons = np.where(valid, None, shapely.is_valid_reason(geoms))
    fixed = np.where(valid, geoms, shapely.make_valid(geoms))
    g = grids.loc[part["site_id"]]
    footprints = [
        box(*_grid_bounds(t, w, h)) for t, w, h in zip(g["transform"], g["width"], g["height"], strict=True)
    ]
    clipped = shapely.intersection(fixed, np.array(footprints, dtype=object))
    rows = []
    for i, row in enumerate(part.index):
        parts = [p for p in _polygons(clipped[i]) if p.area > 0]
        if not parts:
            raise InputError(
                path,
                f"polygon lies outside its site {part.at[row, 'site_id']!r} (nothing left after clipping)",
                row=row,
            )
        notes = []
        if reasons[i] is not None:
            notes.append(f"made valid: {reasons[i]}")
        if shapely.area(fixed[i]) - sum(p.area for p in parts) > 1e-6 * max(shapely.area(fixed[i]), 1.0):
            notes.append("clipped to site footprint")
        if len(parts) > 1:
            notes.append(f"split into {len(parts)} polygons")
        for p in parts:
            rows.append(
                {
                    "row": row,
                    "site_id": part.at[row, "site_id"],
                    "labeller_id": part.at[row, "labeller_id"],
                    "label": label.loc[row],
                    "area_m2": float(p.area),
                    "was_valid": bool(reasons[i] is None),
                    "repair_note": "; ".join(notes) or None,
                    "geometry": p,
                    "crs": crs,
                }
            )
    df = pd.DataFrame(rows)
    order = df.groupby(["site_id", "labeller_id"]).cumcount()
    df["polygon_id"] = df["site_id"] + "/" + df["labeller_id"] + "/" + order.astype(str)
    return df.drop(columns="row")


def _polygons(geom):
    if geom is None or geom.is_empty:
        return []
    if geom.geom_type == "Polygon":
        return [geom]
    if hasattr(geom, "geoms"):
        return [p for g in geom.geoms for p in _polygons(g)]
    return []


def _grid_bounds(transform, width, height):
    a, _, c, _, e, f = transform[:6]
    xs = (c, c + a * width)
    ys = (f, f + e * height)
    return min(xs), min(ys), max(xs), max(ys)


def normalise_item_labels(
    df: pd.DataFrame, path: str, reference: set[str], classes: list[str]
) -> pd.DataFrame:
    require_columns(df, ["item_id", "labeller_id", "label"], path)
    require_ids(df, ["item_id", "labeller_id", "label"], path)
    require_unique(df, ["item_id", "labeller_id"], path)
    if classes:
        bad = ~df["label"].isin(classes)
        if bad.any():
            row = df.index[bad.to_numpy()][0]
            raise InputError(path, f"unknown class {df.at[row, 'label']!r}; allowed: {classes}", row=row)
    out = df[["item_id", "labeller_id", "label"]].reset_index(drop=True).copy()
    out["is_reference"] = out["labeller_id"].isin(reference)
    return out


def site_roles(site_ids: list[str], assignments: pd.DataFrame) -> pd.DataFrame:
    """gold: a reference labeller completed it; multi: ≥2 others did; single: 1; unlabelled: none."""
    done = assignments[assignments["status"] == "completed"]
    ref = done[done["is_reference"]].groupby("site_id").size()
    crowd = done[~done["is_reference"]].groupby("site_id").size()
    df = pd.DataFrame({"site_id": site_ids})
    df["has_reference"] = df["site_id"].map(ref).fillna(0).astype(int) > 0
    df["n_labellers"] = df["site_id"].map(crowd).fillna(0).astype("int64")
    df["role"] = np.select(
        [df["has_reference"], df["n_labellers"] >= 2, df["n_labellers"] == 1],
        ["gold", "multi", "single"],
        default="unlabelled",
    )
    return df


@dataclass(frozen=True)
class LabelInputs:
    """The catalog's label inputs after every whole-table check, before any per-polygon geometry work.

    ``assignments``: normalised (cheap). ``rows``: where the raw label rows (file CRS, file row numbers as
    index), validated by :func:`validate_labels`, can be read back per site (:mod:`raw_label_rows`).
    ``keys``: per site, :func:`label_input_keys`. ``polygons``: raw rows per (site_id, labeller_id).
    """

    assignments: pd.DataFrame
    rows: FileRows | SpilledRows
    keys: dict[str, str]
    polygons: pd.Series
    assignments_path: str
    labels_path: str

    @property
    def drawn(self) -> set[str]:
        """The sites with at least one raw polygon."""
        return set(self.polygons.index.get_level_values(0).astype(str)) if len(self.polygons) else set()

    def polygon_counts(self) -> np.ndarray:
        """Raw rows per assignment, aligned with ``assignments``' rows (:func:`polygon_counts`)."""
        return _per_assignment(self.polygons, self.assignments)

    def normalise(self, grids: pd.DataFrame, site_ids: Iterable[str] | None = None) -> pd.DataFrame:
        """The normalised ``labels`` rows of ``site_ids`` (default: every site)."""
        raw = self.rows.rows_of(self.drawn if site_ids is None else site_ids)
        return normalise_label_geometry(raw, self.labels_path, grids)


def read_label_input_rows(
    catalog: Catalog, site_ids: set[str], grids: pd.DataFrame, spill_to: Path | None = None
) -> LabelInputs:
    """Read the label inputs and run every whole-table check; no geometry is normalised yet.

    ``grids``: one row per site (site_id, scene_id, crs, transform, width, height). The label file is read,
    validated and keyed a batch at a time, so this process holds one batch of it, not the file; the rows
    are spilled by site to the folder ``spill_to`` (ingest: every site is normalised, by tasks that read
    their own rows), or, without it, read again from the file for the sites asked. Bad input raises an
    ``InputError`` naming the file, the row and the reason; a check that looks at rows alone names the
    first bad row of the first batch holding one. The per-polygon finding "nothing left after clipping"
    is :meth:`LabelInputs.normalise`'s (or the part task's) to raise, for the sites it treats.
    """
    ds = catalog.datasets
    a_path = catalog.input_path("input_assignments")
    assignments = normalise_assignments(
        read_table_file(a_path, ds["input_assignments"].columns, ds["input_assignments"].constants),
        a_path,
        site_ids,
        set(catalog.settings.reference_labellers),
    )
    l_path = catalog.input_path("input_labels")
    classes = catalog.settings.label_classes

    check = label_checks(l_path, grids, assignments, classes)

    def batches(sites: set[str] | None = None) -> Iterator[gpd.GeoDataFrame]:
        columns, constants = ds["input_labels"].columns, ds["input_labels"].constants
        for batch in iter_vector_batches(l_path, columns, constants, sites=sites):
            yield check(batch)

    rows = SpilledRows(spill_to, grids) if spill_to is not None else FileRows(l_path, batches)
    digests, counts = LabelRowDigests(), []
    for batch in batches():
        if len(batch):
            wkb = row_wkb(batch)
            digests.add(batch, wkb)
            rows.add(batch, wkb)
            counts.append(batch.groupby(["site_id", "labeller_id"]).size())
    polygons = pd.concat(counts).groupby(level=[0, 1]).sum() if counts else pd.Series(dtype="int64")
    keys = label_input_keys(digests, assignments, grids, classes)
    return LabelInputs(assignments, rows, keys, polygons, str(a_path), str(l_path))


def read_label_inputs(
    catalog: Catalog, site_ids: set[str], grids: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(assignments, labels) of the catalog's inputs, read and normalised on ``grids`` (one row per site:
    site_id, scene_id, crs, transform, width, height): every site normalised afresh."""
    inputs = read_label_input_rows(catalog, site_ids, grids)
    return inputs.assignments, inputs.normalise(grids)


def polygon_counts(labels: pd.DataFrame, assignments: pd.DataFrame) -> np.ndarray:
    """Label rows per assignment (aligned with ``assignments``' rows); raw or normalised rows alike
    (a raw polygon never normalises to nothing: that is an error)."""
    if len(labels) == 0:
        return np.zeros(len(assignments), dtype="int64")
    return _per_assignment(labels.groupby(["site_id", "labeller_id"]).size(), assignments)


def _per_assignment(n_poly: pd.Series, assignments: pd.DataFrame) -> np.ndarray:
    if len(n_poly) == 0:
        return np.zeros(len(assignments), dtype="int64")
    key = pd.MultiIndex.from_frame(assignments[["site_id", "labeller_id"]])
    return n_poly.reindex(key).fillna(0).astype("int64").to_numpy()


def require_no_pending_polygons(assignments: pd.DataFrame, n_polygons: np.ndarray, path: str) -> None:
    """An assignment without ``completed_at`` is pending: it must not have polygons yet."""
    pending_with_polygons = (assignments["status"] == "pending").to_numpy() & (np.asarray(n_polygons) > 0)
    if pending_with_polygons.any():
        row = assignments.index[pending_with_polygons][0]
        who = f"site {assignments.at[row, 'site_id']!r} by {assignments.at[row, 'labeller_id']!r}"
        raise InputError(path, f"assignment of {who} has polygons but no completed_at", row=row)
