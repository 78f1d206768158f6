"""Reading and writing artifact files: GeoParquet 1.1 (zstd, bbox covering), Parquet, content hashes.

The only module that decides how tables become bytes, so every stage writes the same dialect.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import geopandas as gpd
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from geopandas.io.arrow import _geopandas_to_arrow

from schemas.tables import TABLES, validate
from tasks.store.geoparquet import covering_columns, parsed_crs, read_geoparquet, with_crs

_CHUNK = 1 << 20
# Rows per Parquet row group. Tables are written sorted by their key (site_id first), so row-group
# statistics let a batch's filtered read (``read_table(filters=...)``) skip the rest of the table
# instead of decoding all of it: O(batch), not O(dataset), per batch.
ROW_GROUP_ROWS = 8192


def unshare(path: str | Path) -> Path:
    """Make ``path`` safe to write: remove what is there, so the write creates a new file.

    A new version hard-links unchanged files from published versions; opening such a link for writing
    (a retried task, a unit rewritten after being linked) would change the published file through it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() or path.is_symlink():
        path.unlink()
    return path


def file_hash(path: str | Path) -> str:
    """BLAKE2b-128 of a file's bytes, streamed so big scenes never sit in memory."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def bytes_hash(*parts: bytes) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(p)
    return h.hexdigest()


def crs_part_name(crs: str) -> str:
    return "part-" + "".join(ch if ch.isalnum() else "_" for ch in crs) + ".parquet"


def write_table(name: str, df: pd.DataFrame, path: str | Path) -> dict:
    """Validate ``df`` against table ``name`` and write it; return the manifest entry for it.

    Geometric tables are GeoParquet 1.1 with a ``bbox`` covering column. A table with geometry in the
    native CRS (no fixed CRS in its spec) is written as a folder with one part per CRS, since one
    GeoParquet column carries one CRS; ``df`` then needs a ``crs`` column naming each row's CRS. (A table
    too big to hold whole is written in pieces instead: tasks/store/sorted_parts.py.)
    """
    spec = TABLES[name]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df = df.reset_index(drop=True)
    if spec.geometry and spec.geometry_crs is None:
        path.mkdir(parents=True, exist_ok=True)
        files = []
        if len(df) == 0:
            part = gpd.GeoDataFrame(df.drop(columns=["crs"], errors="ignore"), geometry="geometry")
            validate(name, part)
            files.append(_write_geo(part, path / "part-empty.parquet", None))
        for crs, part in df.groupby("crs", sort=True):
            part = gpd.GeoDataFrame(part.drop(columns=["crs"]), geometry="geometry", crs=crs)
            validate(name, part.reset_index(drop=True))
            files.append(_write_geo(part, path / crs_part_name(str(crs)), str(crs)))
        return {"path": path.name, "rows": len(df), "checksum": bytes_hash(*(f.encode() for f in files))}
    validate(name, df)
    if spec.geometry:
        checksum = _write_geo(df, path, spec.geometry_crs)
    else:
        df.to_parquet(unshare(path), index=False, compression="zstd", row_group_size=ROW_GROUP_ROWS)
        checksum = file_hash(path)
    return {"path": path.name, "rows": len(df), "checksum": checksum}


def _write_geo(gdf: gpd.GeoDataFrame, path: Path, crs: str | None) -> str:
    """``gdf.to_parquet`` in this module's dialect, its CRS (``gdf``'s, named by ``crs``) spelled by
    ``crs_projjson`` so that the bytes never depend on the writing thread."""
    pq.write_table(geo_table(gdf, crs), unshare(path), compression="zstd", row_group_size=ROW_GROUP_ROWS)
    return file_hash(path)


def geo_table(gdf: gpd.GeoDataFrame, crs: str | None) -> pa.Table:
    table = _geopandas_to_arrow(gdf, index=False, schema_version="1.1.0", write_covering_bbox=True)
    return with_crs(table, crs)


def read_table(path: str | Path, columns: list[str] | None = None, filters=None) -> pd.DataFrame:
    """Read a table written by :func:`write_table` (``filters``: pyarrow row filters, e.g. one batch's sites).

    A native-CRS folder comes back as one frame with shapely geometries and a ``crs`` column (rows from
    different CRSs cannot share a GeoSeries); group by ``crs`` to get proper GeoDataFrames. A folder of
    plain Parquet parts (a table kept in parts so versions can share them) comes back as their rows.
    """
    path = Path(path)
    if path.is_dir():
        frames = []
        for part in sorted(path.glob("*.parquet")):
            if b"geo" not in (pq.read_metadata(part).metadata or {}):  # a plain table kept in parts
                frames.append(pd.read_parquet(part, columns=columns, filters=filters))
                continue
            gdf = read_geoparquet(part, columns=columns, filters=filters)
            df = pd.DataFrame(gdf)
            # Plain shapely objects: a GeometryArray carries its part's CRS, and pandas refuses to
            # concatenate arrays of different CRSs.
            df[gdf.geometry.name] = pd.Series(gdf.geometry.to_numpy(), index=df.index, dtype=object)
            df["crs"] = gdf.crs.to_string() if gdf.crs is not None else None
            frames.append(df)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    meta = pq.read_metadata(path).metadata or {}
    if b"geo" in meta:
        return read_geoparquet(path, columns=columns, filters=filters)
    return pd.read_parquet(path, columns=columns, filters=filters)


def geo_parts(df: pd.DataFrame) -> dict[str, gpd.GeoDataFrame]:
    """Split a native-CRS table (from :func:`read_table`) into one GeoDataFrame per CRS."""
    return {
        crs: gpd.GeoDataFrame(part.drop(columns="crs"), geometry="geometry", crs=crs)
        for crs, part in df.groupby("crs", sort=True)
    }


def read_attributes(path: Path, exclude: tuple[str, ...] = ()) -> pd.DataFrame | None:
    """A GeoParquet table (file, or folder of parts as ``read_table`` reads it) without its geometry and
    bounding-box columns (and ``exclude``), in ``read_table``'s row order: for aggregates and planning,
    where decoding every polygon would be most of the read. None when it is not GeoParquet."""
    parts = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    frames = []
    for part in parts:
        schema = pq.read_schema(part)  # the footer, read once
        meta = schema.metadata or {}
        if b"geo" not in meta:
            return None
        geo = json.loads(meta[b"geo"])
        skip = {*geo.get("columns", {}), geo.get("primary_column"), *covering_columns(geo), *exclude}
        names = [n for n in schema.names if n not in skip]
        df = pq.read_table(part, columns=names).to_pandas()
        if path.is_dir():  # read_table names each part's CRS
            df["crs"] = part_crs(geo)
        frames.append(df)
    if not frames:
        return None
    return pd.concat(frames, ignore_index=True) if path.is_dir() else frames[0]


def part_crs(geo: dict) -> str | None:
    """The CRS (as ``read_table`` names it) of a part's GeoParquet metadata."""
    col = geo.get("columns", {}).get(geo.get("primary_column"), {})
    if "crs" not in col:
        return "OGC:CRS84"  # GeoParquet: a missing crs means longitude/latitude
    return None if col["crs"] is None else parsed_crs(col["crs"]).to_string()
