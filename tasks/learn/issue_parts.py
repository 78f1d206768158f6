"""The ``label_issues`` folder written in pieces: memory O(batch), not O(dataset).

Each pass-2 batch scores its rows and writes them, in site order, to a staging folder, returning only
what ranking needs (ids, score, CRS, bbox and geometry type: ~140 bytes a row in memory). Ranks are computed
over those light rows, and each CRS part (``part-<crs>.parquet``) is then streamed from the staged pieces
and, on a reprocess, from the previous version's part (the unchanged sites' rows, never decoded), merged
by site, a row group at a time (``tasks/store/sorted_parts``).

Rows of a part are sorted by (site_id, labeller_id, issue_id), recorded as the part's Parquet sort order:
a reader filtering by site (a report page, a reprocess) skips other sites' row groups. ``rank`` orders
the review queue (1 = fix first).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.tables import validate, validate_columns
from tasks.learn.issue_ranking import ISSUE_COLUMNS, issue_ranks
from tasks.store.artifacts import bytes_hash, crs_part_name, geo_table, part_crs, write_table
from tasks.store.geoparquet import geo_metadata
from tasks.store.sorted_parts import (
    GeoExtent,
    SortedPartWriter,
    chain,
    is_streamable,
    iter_rows,
    merge_sorted,
    wkb_type_names,
)

TABLE = "label_issues"
SORT = ["site_id", "labeller_id", "issue_id"]
BOUNDS = ["xmin", "ymin", "xmax", "ymax"]
LIGHT = ["issue_id", "site_id", "labeller_id", "score", "crs", *BOUNDS, "geometry_type"]


@dataclass
class StagedIssues:
    """One batch's rows in the staging folder: per CRS the file (rows in ``SORT`` order), and every row's
    ``LIGHT`` columns."""

    light: pd.DataFrame
    files: dict[str, str] = field(default_factory=dict)


def staging_folder(version_dir: Path, uri: str) -> Path:
    """A clean folder for the staged pieces (an earlier attempt's are removed), beside the table."""
    folder = version_dir / f".{uri}.staging"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def stage_rows(li: pd.DataFrame, staging: str | Path, index: int) -> StagedIssues:
    """Validate a batch's scored rows (all but the global ``rank``) and write them, one file per CRS."""
    li = li.sort_values(SORT).reset_index(drop=True)
    files, lights = {}, []
    for crs, part in li.groupby("crs", sort=True):
        gdf = gpd.GeoDataFrame(part.drop(columns="crs"), geometry="geometry", crs=crs)
        validate(TABLE, gdf.reset_index(drop=True), later=["rank"])
        table = geo_table(gdf, str(crs))
        path = Path(staging) / f"{index:05d}-{crs_part_name(str(crs))}"
        pq.write_table(table, path, compression="zstd")
        files[str(crs)] = str(path)
        lights.append(light_rows(table, str(crs)))
    light = pd.concat(lights, ignore_index=True) if lights else pd.DataFrame(columns=LIGHT)
    return StagedIssues(light, files)


def light_rows(table: pa.Table, crs: str) -> pd.DataFrame:
    """The ``LIGHT`` columns of rows in the written layout (WKB geometry, bbox covering)."""
    bbox = table["bbox"]
    out = table.select(["issue_id", "site_id", "labeller_id", "score"]).to_pandas()
    out["crs"] = crs
    for b in BOUNDS:
        out[b] = pc.struct_field(bbox, b).to_numpy(zero_copy_only=False).astype(float)
    out["geometry_type"] = wkb_type_names(table["geometry"])
    return out


def extent(light: pd.DataFrame) -> GeoExtent:
    """The bbox and geometry types of the rows whose ``LIGHT`` columns these are."""
    return GeoExtent.of_rows(light[BOUNDS].to_numpy(float), light["geometry_type"])


@dataclass
class PreviousParts:
    """The previous version's rows of some sites: their ``LIGHT`` columns, the part of each CRS, and the
    sites whose rows cannot be streamed (a part in another layout: they are recomputed)."""

    light: pd.DataFrame
    parts: dict[str, Path]
    unusable: set[str]


def read_previous(folder: Path, site_ids: list[str]) -> PreviousParts:
    """``LIGHT`` columns of the previous parts' rows of ``site_ids``, a row group at a time (geometry read
    only for its type, and dropped)."""
    keep = pa.array(site_ids, pa.large_string())
    lights, parts, unusable = [], {}, set()
    for path in sorted(folder.glob("*.parquet")):
        if pq.read_metadata(path).num_rows == 0:
            continue
        if not is_streamable(path, SORT):
            sites = pq.read_table(path, columns=["site_id"])["site_id"].to_pylist()
            unusable |= set(map(str, sites)) & set(site_ids)
            continue
        crs = part_crs(geo_metadata(pq.read_schema(path)))
        cols = ["issue_id", "site_id", "labeller_id", "score", "geometry", "bbox"]
        found = [light_rows(t, crs) for t in iter_rows(path, keep, columns=cols)]
        if found:
            lights += found
            parts[crs] = path
    light = pd.concat(lights, ignore_index=True) if lights else pd.DataFrame(columns=LIGHT)
    return PreviousParts(light, parts, unusable)


def write_parts(
    folder: Path, light: pd.DataFrame, staged: list[StagedIssues], previous: PreviousParts | None
) -> dict:
    """Rank ``light`` (every row of the new table: staged and previous) and write one part per CRS,
    merged by site from the staged files and the previous part (rows of sites in ``light`` only);
    return the manifest record."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.parquet"):
        stale.unlink()
    light = light.reset_index(drop=True)
    ranked = light.assign(rank=issue_ranks(light))
    validate_ranks(ranked)
    if not len(light):
        return write_table(TABLE, _empty_frame().assign(geometry=gpd.GeoSeries([])), folder)
    files = []
    for crs, rows in ranked.groupby("crs", sort=True):
        rows = rows.sort_values(SORT)
        out = folder / crs_part_name(str(crs))
        sources = _sources(str(crs), rows, staged, previous)
        writer = SortedPartWriter(out, part_schema(str(crs)), SORT, extent(rows))
        try:
            _write_ranked(writer, merge_sorted(sources, "site_id"), rows)
            files.append(writer.close())
        except BaseException:
            writer.abort()
            raise
    return {"path": folder.name, "rows": len(light), "checksum": bytes_hash(*(f.encode() for f in files))}


def validate_ranks(ranked: pd.DataFrame) -> None:
    """The table's key and ``rank`` over all rows (every other column was validated when staged)."""
    validate_columns(TABLE, ranked, ["rank"])


def _sources(crs: str, rows: pd.DataFrame, staged: list[StagedIssues], previous: PreviousParts | None):
    """Streams of this CRS's rows in site order: the previous part (its rows of sites in ``rows``) and
    the staged files, chained while their site ranges follow one another."""
    sources = []
    if previous is not None and crs in previous.parts:
        sites = sorted(set(rows["site_id"]) & set(previous.light["site_id"]))
        if sites:
            sources.append(iter_rows(previous.parts[crs], pa.array(sites, pa.large_string())))
    pieces = sorted(
        (s.light.loc[s.light["crs"] == crs, "site_id"].agg(["min", "max"]).tolist(), s.files[crs])
        for s in staged
        if crs in s.files
    )
    chains: list[list[str]] = []
    last = None
    for (lo, hi), path in pieces:
        if not chains or lo <= last:
            chains.append([])
        chains[-1].append(path)
        last = hi
    sources += [chain(iter_rows(p) for p in paths) for paths in chains]
    return sources


def _write_ranked(writer: SortedPartWriter, chunks, rows: pd.DataFrame) -> None:
    """Write the merged chunks with their ranks, checking that they are exactly ``rows``, in order."""
    ids, ranks = rows["issue_id"].to_numpy(object), rows["rank"].to_numpy(np.int64)
    at = 0
    for t in chunks:
        n = t.num_rows
        got = np.asarray(t["issue_id"].to_pylist(), dtype=object)
        if at + n > len(ids) or not (got == ids[at : at + n]).all():
            raise RuntimeError(f"{writer.path}: merged rows are not the ranked rows (at row {at})")
        if "rank" in t.column_names:  # a previous version's rank
            t = t.drop_columns(["rank"])
        writer.write(t.append_column("rank", pa.array(ranks[at : at + n])))
        at += n
    if at != len(ids):
        raise RuntimeError(f"{writer.path}: {len(ids) - at} ranked rows were not found in the pieces")


def _empty_frame() -> pd.DataFrame:
    """No rows, the table's columns with its dtypes (ids as text)."""
    floats = ("score", "area_m2", "mean_p_field", "consensus_agreement")
    dtypes = {
        c: np.int64 if c in ("rank", "n_pixels") else float if c in floats else "str" for c in ISSUE_COLUMNS
    }
    return pd.DataFrame({c: pd.Series(dtype=dtypes[c]) for c in ISSUE_COLUMNS if c != "geometry"})


def part_schema(crs: str) -> pa.Schema:
    """The columns, types and GeoParquet metadata of a ``label_issues`` part of ``crs``: what geopandas
    writes for the table's dtypes, whatever the rows."""
    empty = gpd.GeoDataFrame(_empty_frame().drop(columns="crs"), geometry=gpd.GeoSeries([], crs=crs))
    return geo_table(empty, crs).schema
