"""The ingest stage as one plain function: catalog inputs → validated artifact tables in a folder.

Runs on whatever Dask scheduler is active (threads when called plainly, the cluster when the Prefect
wrapper opens a client). The tiles of all scenes are one Dask computation of per-scene tasks, each holding
a strip of its scene and a few tiles, so pixel memory follows the tasks in flight, not the region.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
from shapely.geometry import box

from schemas.catalog import Catalog
from tasks.ingest.imagery import Scene, find_scenes, open_scene, site_windows
from tasks.ingest.label_keys import LABELS_STAGE
from tasks.ingest.label_parts import PreparedLabels, prepare_labels
from tasks.ingest.labels import (
    _grid_bounds,
    normalise_item_labels,
    normalise_sites,
    polygon_counts,
    read_label_input_rows,
    require_no_pending_polygons,
    site_roles,
)
from tasks.ingest.readers import read_table_file, read_vector
from tasks.ingest.tiles import STAT_COLUMNS, TILE_COLUMNS, tile_keys, tile_stats, tile_unit
from tasks.store.artifacts import write_table
from tasks.store.errors import InputError
from tasks.store.hash_cache import HashCache
from tasks.store.reuse import (
    LABEL_TABLES,
    LABEL_TABLES_UNIT,
    SITE_LABELS,
    Reuse,
    label_tables_key,
    previous_rows,
    reuse_counts,
    site_label_keys,
    write_keys,
)
from tasks.store.site_rows import read_site_rows
from tasks.store.stage_result import StageResult


@dataclass
class IngestResult(StageResult):
    """Artifact records of the ingest stage, plus every input file's hash for the manifest."""

    inputs: list[dict] = field(default_factory=list)


STAGE = "ingest"


def _input_record(name: str, path: str, hashes: HashCache) -> dict:
    p = Path(path)
    return {"dataset": name, "path": str(p), "bytes": p.stat().st_size, "hash": hashes.hash(p)}


def run_ingest(
    catalog: Catalog, out_dir: str | Path, progress=None, reuse: Reuse | None = None
) -> IngestResult:
    """Read every input the catalog names, validate and normalise it, write the ingest artifacts.

    Input files are hashed through the dataset's hash cache (unchanged files are not reread). With
    ``reuse``, a tile whose key (``tile_keys``) equals the previous version's takes its statistics from
    that version's ``tiles`` table instead of reading pixels, and a site whose raw label inputs' key
    (``label_input_keys``: its label rows, assignments and grid) equals the previous version's takes its
    normalised ``labels`` rows from there instead of repairing, reprojecting and clipping its polygons
    again. ``labels`` is kept in parts of sites named by their raw keys (``tasks.ingest.label_parts``):
    a part whose sites are all unchanged is the previous version's file, hard-linked, neither read nor
    written. Every whole-table check of the label inputs runs either way, and assignments, sites and item
    labels are always normalised afresh (cheap). Every table is written sorted by its primary key.
    """
    hashes = HashCache.for_root(catalog.root_path)
    labels_dir = Path(out_dir) / catalog.datasets["labels"].uri
    # raw label rows wait on disk beside the table they become, where the part tasks' workers write
    spill = labels_dir.with_name(f".{labels_dir.name}.raw")
    try:
        return _run_ingest(catalog, Path(out_dir), progress, reuse or Reuse(), hashes, spill)
    finally:
        hashes.save()
        shutil.rmtree(spill, ignore_errors=True)


def _run_ingest(
    catalog: Catalog, out_dir: Path, progress, reuse: Reuse, hashes: HashCache, spill: Path
) -> IngestResult:
    s = catalog.settings
    ds = catalog.datasets
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ref = set(s.reference_labellers)

    scene_paths = find_scenes(catalog.input_path("imagery"))
    scenes = [open_scene(p, s.ingest.band_names, s.ingest.required_bands, hashes.hash) for p in scene_paths]
    dup = pd.Series([sc.scene_id for sc in scenes]).duplicated()
    if dup.any():
        twin = scenes[int(dup.idxmax())]
        raise InputError(
            twin.path, f"two imagery files share the name {twin.scene_id!r}; scene ids must be unique"
        )
    inputs = [
        {"dataset": "imagery", "path": sc.path, "bytes": Path(sc.path).stat().st_size, "hash": sc.file_hash}
        for sc in scenes
    ]

    sites_path = catalog.input_path("input_sites")
    sites = normalise_sites(
        read_vector(sites_path, ds["input_sites"].columns, ds["input_sites"].constants), sites_path
    )
    inputs.append(_input_record("input_sites", sites_path, hashes))
    pairs = site_windows(sites, scenes, sites_path)
    timings["scan"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    by_id = {sc.scene_id: sc for sc in scenes}
    keys = tile_keys(pairs, by_id, s.ingest.cloud_threshold)
    reused_tiles = _previous_tiles(reuse, ds["tiles"].uri, reuse.reusable(STAGE, keys))
    reused = set(reused_tiles.index)
    units = [tile_unit(a, b) for a, b in zip(pairs["site_id"], pairs["scene_id"], strict=True)]
    todo = pairs[[u not in reused for u in units]]
    tiles = _all_tile_stats(todo, by_id, s.ingest.cloud_threshold, progress)
    tiles = _with_reused(tiles, pairs[[u in reused for u in units]], reused_tiles, by_id)
    timings["tiles"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    grids = _primary_grids(tiles, pairs)
    label_inputs = read_label_input_rows(catalog, set(sites["site_id"]), grids, spill_to=spill)
    inputs.append(_input_record("input_assignments", label_inputs.assignments_path, hashes))
    inputs.append(_input_record("input_labels", label_inputs.labels_path, hashes))
    label_keys = label_inputs.keys
    labels = prepare_labels(label_inputs, grids, reuse, ds["labels"].uri)
    assignments = label_inputs.assignments
    # raw rows: an assignment has normalised polygons exactly when it has raw ones
    raw_counts = label_inputs.polygon_counts()
    require_no_pending_polygons(assignments, raw_counts, label_inputs.assignments_path)

    if "input_item_labels" in ds and Path(catalog.input_path("input_item_labels")).exists():
        i_path = catalog.input_path("input_item_labels")
        item_labels = normalise_item_labels(
            read_table_file(i_path, ds["input_item_labels"].columns, ds["input_item_labels"].constants),
            i_path,
            ref,
            s.item_classes,
        )
        inputs.append(_input_record("input_item_labels", i_path, hashes))
    elif "input_item_labels" in ds and not ds["input_item_labels"].optional:
        raise InputError(catalog.input_path("input_item_labels"), "file not found")
    else:
        item_labels = pd.DataFrame(
            {
                "item_id": pd.Series(dtype=object),
                "labeller_id": pd.Series(dtype=object),
                "label": pd.Series(dtype=object),
                "is_reference": pd.Series(dtype=bool),
            }
        )

    roles = site_roles(list(sites["site_id"]), assignments)
    sites_table = _sites_table(sites, grids, roles)
    timings["labels"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    labels_dir = out_dir / ds["labels"].uri
    labels.write(labels_dir, labels_dir.name, reuse)  # normalises part by part; a bad polygon raises here
    shutil.rmtree(spill)
    reused_label_sites = labels.reused
    assignments["n_polygons"] = polygon_counts(labels.columns, assignments)
    site_keys, reused_site_keys = _site_label_keys(labels, labels_dir, assignments, reuse)
    artifacts = {
        "sites": write_table("sites", _canonical(sites_table, "site_id"), out_dir / ds["sites"].uri),
        "tiles": write_table("tiles", _tiles_gdf(tiles), out_dir / ds["tiles"].uri),
        "labels": labels.record,
        "assignments": write_table(
            "assignments",
            _canonical(assignments, "site_id", "labeller_id"),
            out_dir / ds["assignments"].uri,
        ),
        "item_labels": write_table(
            "item_labels", _canonical(item_labels, "item_id", "labeller_id"), out_dir / ds["item_labels"].uri
        ),
        f"reuse_keys/{STAGE}": write_keys(out_dir, STAGE, dict(sorted(keys.items())), reused, reuse),
        f"reuse_keys/{LABELS_STAGE}": write_keys(
            out_dir, LABELS_STAGE, label_keys, reused_label_sites, reuse
        ),
        f"reuse_keys/{SITE_LABELS}": write_keys(out_dir, SITE_LABELS, site_keys, reused_site_keys, reuse),
    }
    # what SITE_LABELS was computed from: a stage trusts the keys only while the tables are these
    tables_key = {
        LABEL_TABLES_UNIT: label_tables_key(out_dir / ds["labels"].uri, out_dir / ds["assignments"].uri)
    }
    artifacts[f"reuse_keys/{LABEL_TABLES}"] = write_keys(out_dir, LABEL_TABLES, tables_key, set(), reuse)
    timings["write"] = time.perf_counter() - t3
    valid = labels.columns["was_valid"]
    notes = [f"{int((~valid).sum())} invalid polygons repaired"] if len(valid) else []
    counts = {
        "scenes": len(scenes),
        "sites": len(sites_table),
        **{
            f"sites_{r}": int((sites_table["role"] == r).sum())
            for r in ("gold", "multi", "single", "unlabelled")
        },
        "polygons": len(labels.columns),
        "assignments": len(assignments),
        "no_field_assignments": int(
            ((assignments.status == "completed") & (assignments.n_polygons == 0)).sum()
        ),
        "item_labels": len(item_labels),
        **reuse_counts(STAGE, len(keys), len(reused)),
        **reuse_counts(LABELS_STAGE, len(label_keys), len(reused_label_sites)),
    }
    return IngestResult(artifacts=artifacts, timings=timings, counts=counts, notes=notes, inputs=inputs)


def _all_tile_stats(pairs, scenes: dict[str, Scene], cloud_threshold, progress) -> pd.DataFrame:
    """Statistics of every tile in ``pairs``, all scenes' tasks in one Dask computation.

    Not in site batches: a batch that cuts a scene's tiles in two decodes the block rows they share
    twice and waits for its slowest scene before the next batch starts. Memory does not need batches
    here: a task holds one strip and a few tiles whatever the region (``tasks.ingest.pixels``), and only
    the statistics come back.
    """
    if not len(pairs):
        return pd.DataFrame(columns=[*TILE_COLUMNS, "coverage"])
    tiles = tile_stats(pairs, scenes, cloud_threshold)
    if progress is not None:
        n = int(pairs["site_id"].nunique())
        progress(n, n)
    tiles["coverage"] = pairs["coverage"].to_numpy()
    return tiles


def _primary_grids(tiles: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """The grid each site uses: the covering scene with most valid pixels (ties: scene id)."""
    ranked = tiles.assign(_score=tiles["valid_fraction"] * tiles["coverage"]).sort_values(
        ["site_id", "_score", "scene_id"], ascending=[True, False, True]
    )
    best = ranked.drop_duplicates("site_id")
    return best[["site_id", "scene_id", "crs", "transform", "width", "height"]].reset_index(drop=True)


def _sites_table(sites: gpd.GeoDataFrame, grids: pd.DataFrame, roles: pd.DataFrame) -> gpd.GeoDataFrame:
    df = sites[["site_id"]].merge(grids, on="site_id").merge(roles, on="site_id")
    footprints = []
    for crs, part in df.groupby("crs"):
        geoms = [
            box(*_grid_bounds(t, w, h))
            for t, w, h in zip(part["transform"], part["width"], part["height"], strict=True)
        ]
        footprints.append(gpd.GeoSeries(geoms, index=part.index, crs=crs).to_crs(4326))
    geom = pd.concat(footprints).reindex(df.index)
    out = gpd.GeoDataFrame(df, geometry=geom.values, crs=4326)
    out["width"] = out["width"].astype("int64")
    out["height"] = out["height"].astype("int64")
    return out[
        [
            "site_id",
            "scene_id",
            "crs",
            "transform",
            "width",
            "height",
            "role",
            "n_labellers",
            "has_reference",
            "geometry",
        ]
    ]


def _tiles_gdf(tiles: pd.DataFrame) -> gpd.GeoDataFrame:
    parts = []
    for crs, part in tiles.groupby("crs"):
        geoms = [
            box(*_grid_bounds(t, w, h))
            for t, w, h in zip(part["transform"], part["width"], part["height"], strict=True)
        ]
        parts.append(gpd.GeoSeries(geoms, index=part.index, crs=crs).to_crs(4326))
    geom = pd.concat(parts).reindex(tiles.index)
    out = gpd.GeoDataFrame(tiles.drop(columns=["coverage"]), geometry=geom.values, crs=4326)
    out["width"] = out["width"].astype("int64")
    out["height"] = out["height"].astype("int64")
    return out


def _canonical(df: pd.DataFrame, *key: str) -> pd.DataFrame:
    """``df`` sorted by its primary key: the same inputs always give the same row order."""
    return df.sort_values(list(key), kind="stable").reset_index(drop=True)


def _site_label_keys(
    labels: PreparedLabels, labels_dir: Path, assignments: pd.DataFrame, reuse: Reuse
) -> tuple[dict[str, str], set[str]]:
    """Every site's ``site_label_keys`` value, recorded once here for the later stages and the watcher;
    (keys, the sites whose key was taken over). A site whose raw label inputs are unchanged has the same
    normalised rows, so its previous key stands; a site in a part written now has the key its rows got as
    they were written; only the rest (a linked part's site without a previous key, a site without
    polygons) are hashed here, their rows read back from the written folder."""
    sites = set(assignments["site_id"].astype(str))
    prev = reuse.previous_keys(SITE_LABELS) if reuse.enabled else {}
    kept = {s: prev[s][0] for s in labels.reused & sites if s in prev}
    written = {s: k for s, k in labels.site_keys.items() if s in sites and s not in kept}
    todo = sorted(sites - kept.keys() - written.keys())
    rest = {}
    if todo:
        stored = sorted(set(todo) & set(labels.columns["site_id"].astype(str)))
        rows = read_site_rows(labels_dir, stored) if stored else pd.DataFrame()
        rest = site_label_keys(rows, assignments[assignments["site_id"].astype(str).isin(todo)])
    return dict(sorted((kept | written | rest).items())), set(kept)


def _previous_tiles(reuse: Reuse, uri: str, units: set[str]) -> pd.DataFrame:
    """Statistics columns of the reusable tiles in the previous version's ``tiles``, indexed by unit id.

    A unit whose row is missing there is left out (and so recomputed).
    """
    prev = previous_rows(reuse, uri, {u.split("/", 1)[0] for u in units})
    if prev is None or len(prev) == 0:
        return pd.DataFrame(columns=list(STAT_COLUMNS))
    ids = [tile_unit(a, b) for a, b in zip(prev["site_id"], prev["scene_id"], strict=True)]
    prev = pd.DataFrame(prev[list(STAT_COLUMNS)]).set_axis(ids)
    return prev[prev.index.isin(units)]


def _with_reused(
    computed: pd.DataFrame, pairs: pd.DataFrame, previous: pd.DataFrame, scenes: dict[str, Scene]
) -> pd.DataFrame:
    """The computed tiles plus the reused ones (this run's window columns, the previous statistics),
    in canonical order (site_id, scene_id)."""
    if len(pairs):
        old = pairs[["site_id", "scene_id", "crs", "transform", "width", "height", "coverage"]]
        old = old.reset_index(drop=True).copy()
        old["band_names"] = [list(scenes[s].band_names) for s in old["scene_id"]]
        units = [tile_unit(a, b) for a, b in zip(old["site_id"], old["scene_id"], strict=True)]
        stats = previous.loc[units].reset_index(drop=True)
        for c in STAT_COLUMNS:  # Parquet gives arrays back for the per-band lists; store lists as computed
            old[c] = [v.tolist() if isinstance(v, np.ndarray) else v for v in stats[c]]
        frames = [f for f in (computed, old) if len(f)]
        tiles = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    else:
        tiles = computed
    return _canonical(tiles[[*TILE_COLUMNS, "coverage"]], "site_id", "scene_id")
