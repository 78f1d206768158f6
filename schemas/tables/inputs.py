"""Tables the ingest stage writes: normalised inputs."""

from __future__ import annotations

import pandera.pandas as pa

from schemas.tables.core import _FRACTION, ID, ROLES, STATUSES, Col, TableSpec, _ids  # noqa: F401

SITES = TableSpec(
    "sites",
    "One row per labelling site: its footprint, the scene grid it uses, and its role in the campaign.",
    {
        "site_id": _ids("Site identifier."),
        "scene_id": Col(ID, "Scene whose pixel grid the site uses (the one with most valid pixels)."),
        "crs": Col(ID, "Native projected CRS of the site grid, e.g. EPSG:32630."),
        "transform": Col(object, "Affine transform of the site grid (a, b, c, d, e, f)."),
        "width": Col("int64", "Grid width in pixels.", checks=(pa.Check.gt(0),)),
        "height": Col("int64", "Grid height in pixels.", checks=(pa.Check.gt(0),)),
        "role": Col(
            ID,
            "gold | multi | single | unlabelled, derived from assignments.",
            checks=(pa.Check.isin(ROLES),),
        ),
        "n_labellers": Col("int64", "Completed non-reference assignments.", checks=(pa.Check.ge(0),)),
        "has_reference": Col(bool, "A reference (expert) labeller completed this site."),
        "geometry": Col(object, "Footprint, EPSG:4326."),
    },
    ("site_id",),
    geometry=True,
    geometry_crs="EPSG:4326",
)

TILES = TableSpec(
    "tiles",
    "One row per site tile per scene: band statistics, nodata and cloud shares, content hash.",
    {
        "site_id": _ids("Site identifier."),
        "scene_id": _ids("Scene file stem the pixels come from."),
        "crs": Col(ID, "Native CRS of the scene."),
        "transform": Col(object, "Affine transform of the tile window (a, b, c, d, e, f)."),
        "width": Col("int64", "Tile width in pixels."),
        "height": Col("int64", "Tile height in pixels."),
        "band_names": Col(object, "Band names in order (B, G, R, NIR for the demo)."),
        "mean": Col(object, "Per-band mean of valid pixels (NaN when no pixel is valid)."),
        "std": Col(object, "Per-band standard deviation of valid pixels."),
        "p02": Col(object, "Per-band 2nd percentile of valid pixels."),
        "p50": Col(object, "Per-band median of valid pixels."),
        "p98": Col(object, "Per-band 98th percentile of valid pixels."),
        "valid_fraction": Col(float, "Share of pixels neither nodata nor cloud.", checks=_FRACTION),
        "nodata_fraction": Col(float, "Share of pixels that are nodata in any band.", checks=_FRACTION),
        "cloud_fraction": Col(
            float, "Share of bright (cloud-like) pixels among data pixels.", checks=_FRACTION
        ),
        "content_hash": Col(
            ID, "XXH3-128 of the tile's pixel bytes and shape: changes iff the pixels change."
        ),
        "geometry": Col(object, "Tile footprint, EPSG:4326."),
    },
    ("site_id", "scene_id"),
    geometry=True,
    geometry_crs="EPSG:4326",
)

LABELS = TableSpec(
    "labels",
    "Normalised label polygons, clipped to their site, in the site's native CRS; in parts of 64 "
    "sites per CRS (`part-<CRS>-<n>-<key>.parquet`, named by their sites' keys so versions share "
    "unchanged parts).",
    {
        "polygon_id": _ids("Stable id: site_id/labeller_id/ordinal within the assignment."),
        "site_id": _ids("Site identifier."),
        "labeller_id": _ids("Labeller identifier."),
        "label": Col(ID, "Polygon class; null for an unclassed field.", nullable=True),
        "area_m2": Col(float, "Polygon area in square metres (native CRS).", checks=(pa.Check.gt(0),)),
        "was_valid": Col(bool, "The input geometry was valid as drawn."),
        "repair_note": Col(ID, "What make_valid / clipping changed; null when nothing.", nullable=True),
        "geometry": Col(object, "Polygon in the site's native CRS."),
    },
    ("polygon_id",),
    geometry=True,
)

ASSIGNMENTS = TableSpec(
    "assignments",
    "Who was asked to label which site, and whether they finished. Completed with 0 polygons = no fields.",
    {
        "site_id": _ids("Site identifier."),
        "labeller_id": _ids("Labeller identifier."),
        "completed_at": Col(
            "datetime64[us, UTC]", "When the assignment was submitted; null = pending.", True
        ),
        "status": Col(ID, "completed | pending.", checks=(pa.Check.isin(STATUSES),)),
        "n_polygons": Col(
            "int64", "Polygons in the labels table for this assignment.", checks=(pa.Check.ge(0),)
        ),
        "is_reference": Col(bool, "The labeller is a reference (expert) labeller."),
    },
    ("site_id", "labeller_id"),
)

ITEM_LABELS = TableSpec(
    "item_labels",
    "Image-level class labels, one per item per labeller.",
    {
        "item_id": _ids("Item identifier (the site id for site-level land cover)."),
        "labeller_id": _ids("Labeller identifier."),
        "label": _ids("Class given."),
        "is_reference": Col(bool, "The labeller is a reference (expert) labeller."),
    },
    ("item_id", "labeller_id"),
)
