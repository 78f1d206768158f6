"""Reading and writing artifact files: GeoParquet 1.1 (zstd, bbox covering), Parquet, content hashes.

The only module that decides how tables become bytes, so every stage writes the same dialect.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pandera.pandas as pda
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from geopandas.io.arrow import _geopandas_to_arrow

from schemas.tables import TABLES, SchemaViolation, validate
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


def write_table(
    name: str,
    df: pd.DataFrame,
    path: str | Path,
    carried: CarriedRows | None = None,
    changed: Sequence[str] = (),
) -> dict:
    """Validate ``df`` against table ``name`` and write it; return the manifest entry for it.

    Geometric tables are GeoParquet 1.1 with a ``bbox`` covering column. A table with geometry in the
    native CRS (no fixed CRS in its spec) is written as a folder with one part per CRS, since one
    GeoParquet column carries one CRS; ``df`` then needs a ``crs`` column naming each row's CRS.

    ``carried`` (native-CRS tables): rows taken over from a previous version by :func:`read_carried`,
    marked in ``df`` by their ``CARRIED`` locator (-1 on fresh rows). Their geometry and bbox are copied
    as written (WKB), never decoded; fresh rows are validated fully, carried ones in the ``changed``
    columns only (the rest is the file's content, validated when it was written), the key over all rows.
    The file is the one this function writes for the same rows with decoded geometries.
    """
    spec = TABLES[name]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df = df.reset_index(drop=True)
    if carried is not None and not (spec.geometry and spec.geometry_crs is None):
        raise ValueError(f"table {name!r}: carried rows are for native-CRS geometric tables")
    if spec.geometry and spec.geometry_crs is None:
        path.mkdir(parents=True, exist_ok=True)
        files = []
        if carried is None or CARRIED not in df:
            df = df.assign(**{CARRIED: -1})
        if len(df) == 0:
            part = gpd.GeoDataFrame(df.drop(columns=["crs", CARRIED], errors="ignore"), geometry="geometry")
            validate(name, part)
            files.append(_write_geo(part, path / "part-empty.parquet", None))
        for crs, part in df.groupby("crs", sort=True):
            out = path / crs_part_name(str(crs))
            loc = part[CARRIED].to_numpy(np.int64)
            part = gpd.GeoDataFrame(part.drop(columns=["crs", CARRIED]), geometry="geometry", crs=crs)
            if (loc < 0).all():
                validate(name, part.reset_index(drop=True))
                files.append(_write_geo(part, out, str(crs)))
            else:
                carried_part = carried.parts.get(str(crs))
                files.append(_write_with_carried(name, part, loc, carried_part, changed, out, str(crs)))
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
    pq.write_table(_geo_table(gdf, crs), unshare(path), compression="zstd", row_group_size=ROW_GROUP_ROWS)
    return file_hash(path)


def _geo_table(gdf: gpd.GeoDataFrame, crs: str | None) -> pa.Table:
    table = _geopandas_to_arrow(gdf, index=False, schema_version="1.1.0", write_covering_bbox=True)
    return with_crs(table, crs)


_BBOX = pa.struct([(k, pa.float64()) for k in ("xmin", "ymin", "xmax", "ymax")])
CARRIED = "_carried"  # column of a frame from read_carried: the row's index among its part's carried rows


@dataclass
class CarriedRows:
    """Geometry (WKB) and ``bbox`` columns of rows read by :func:`read_carried`, per CRS, as written."""

    parts: dict[str, pa.Table] = field(default_factory=dict)


def read_carried(path: str | Path, filters=None) -> tuple[pd.DataFrame, CarriedRows]:
    """Rows of a native-CRS table folder (as :func:`read_table`: a ``crs`` column, parts in CRS order)
    with their attributes decoded and their geometries left as written, for :func:`write_table` to
    copy: the frame has ``geometry`` None and a ``CARRIED`` locator into ``CarriedRows.parts[crs]``."""
    frames, parts = [], {}
    for part in sorted(Path(path).glob("*.parquet")):
        meta = pq.read_schema(part).metadata or {}
        if b"geo" not in meta:
            raise ValueError(f"{part}: not GeoParquet")
        geo = json.loads(meta[b"geo"])
        table = pq.read_table(part, filters=filters)
        gcol = geo["primary_column"]
        if gcol != "geometry" or "bbox" not in table.column_names:
            raise ValueError(f"{part}: no geometry and bbox covering columns to carry")
        if (table.schema.field("geometry").type, table.schema.field("bbox").type) != (pa.binary(), _BBOX):
            raise ValueError(f"{part}: geometry or bbox not in the layout write_table writes")
        crs = _crs_of(geo)
        parts[crs] = table.select(["geometry", "bbox"])
        df = table.drop_columns(["bbox"]).to_pandas()
        df["geometry"] = None
        df["crs"] = crs
        df[CARRIED] = np.arange(len(df), dtype=np.int64)
        frames.append(df)
    df = (
        pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["geometry", "crs", CARRIED])
    )
    return df, CarriedRows(parts)


def _write_with_carried(
    name: str, part: gpd.GeoDataFrame, loc: np.ndarray, kept: pa.Table | None, changed, out: Path, crs: str
) -> str:
    """One CRS part of ``write_table`` with carried rows: fresh rows converted as geopandas converts
    them, carried geometry and bbox taken from ``kept``, the rows in ``part``'s order."""
    fresh = loc < 0
    if kept is None or loc.max() >= len(kept):
        raise ValueError(f"table {name!r}: carried rows of CRS {part.crs} not in the carried parts")
    new = part[fresh].reset_index(drop=True)
    validate(name, new)
    _validate_columns(name, pd.DataFrame(part.drop(columns="geometry")), [*changed])
    # geopandas' own conversion of the fresh rows (also what gives the schema and metadata skeleton)
    fresh_table = _geo_table(new, crs)
    attrs = pd.DataFrame(part.copy(deep=False))
    attrs["geometry"] = None
    table = pa.Table.from_pandas(attrs, preserve_index=False)
    take = np.where(fresh, np.cumsum(fresh) - 1, len(new) + loc)
    cols = {}
    for col in ("geometry", "bbox"):
        both = pa.chunked_array(
            [*fresh_table[col].chunks, *kept[col].chunks], fresh_table.schema.field(col).type
        )
        cols[col] = both.take(pa.array(take))
    table = table.set_column(
        table.schema.get_field_index("geometry"), fresh_table.schema.field("geometry"), cols["geometry"]
    )
    table = table.append_column(fresh_table.schema.field("bbox"), cols["bbox"])
    # geopandas' metadata of the fresh rows with what depends on all rows (types, bbox) recomputed
    geo = json.loads(fresh_table.schema.metadata[b"geo"])
    bounds = [
        _nan_reduce(cols["bbox"], k, f)
        for k, f in (("xmin", np.nanmin), ("ymin", np.nanmin), ("xmax", np.nanmax), ("ymax", np.nanmax))
    ]
    meta = {}
    for key, value in geo["columns"]["geometry"].items():
        if key == "geometry_types":
            meta[key] = _wkb_types(cols["geometry"])
            if np.isfinite(bounds).all():
                meta["bbox"] = bounds
        elif key != "bbox":
            meta[key] = value
    geo["columns"]["geometry"] = meta
    metadata = dict(table.schema.metadata) | {b"geo": json.dumps(geo).encode("utf-8")}
    pq.write_table(
        table.replace_schema_metadata(metadata),
        unshare(out),
        compression="zstd",
        row_group_size=ROW_GROUP_ROWS,
    )
    return file_hash(out)


def _validate_columns(name: str, df: pd.DataFrame, columns: list[str]) -> None:
    """``validate`` restricted to ``columns`` and the table's key (unique over all of ``df``)."""
    schema = TABLES[name].pandera()
    sub = pda.DataFrameSchema(
        {c: schema.columns[c] for c in columns}, unique=schema.unique, strict=False, name=name
    )
    try:
        sub.validate(df, lazy=True)
    except pda.errors.SchemaErrors as exc:
        lines = [
            f"column {r.column!r} row {r.index}: {r.check} (value {r.failure_case!r})"
            for r in exc.failure_cases.head(5).itertuples()
        ]
        raise SchemaViolation(f"table {name!r} fails its schema:\n  " + "\n  ".join(lines)) from None


_WKB_TYPES = ("Point", "LineString", "Polygon", "MultiPoint", "MultiLineString", "MultiPolygon",
              "GeometryCollection")  # fmt: skip


def _wkb_types(wkb: pa.ChunkedArray) -> list[str]:
    """GeoParquet ``geometry_types`` of ISO WKB values, as geopandas names them (" Z" when 3D)."""
    names = set()
    for head in pc.unique(pc.binary_slice(wkb.drop_null(), 0, 5)).to_pylist():
        code = int.from_bytes(head[1:5], "little" if head[0] == 1 else "big")
        base, dim = code % 1000, code // 1000
        if not 1 <= base <= 7 or dim > 3:
            raise ValueError(f"unexpected WKB geometry type {code}")
        names.add(_WKB_TYPES[base - 1] + (" Z" if dim in (1, 3) else ""))
    return sorted(names)


def _nan_reduce(bbox: pa.ChunkedArray, key: str, fn) -> float:
    values = pc.struct_field(bbox, key).to_numpy(zero_copy_only=False).astype(float)
    return float(fn(values)) if len(values) else float("nan")


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


def read_attributes(path: Path) -> pd.DataFrame | None:
    """A GeoParquet table (file, or folder of parts as ``read_table`` reads it) without its geometry and
    bounding-box columns, in ``read_table``'s row order: for aggregates and planning, where decoding every
    polygon would be most of the read. None when it is not GeoParquet."""
    parts = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    frames = []
    for part in parts:
        meta = pq.read_schema(part).metadata or {}
        if b"geo" not in meta:
            return None
        geo = json.loads(meta[b"geo"])
        skip = set(geo.get("columns", {})) | {geo.get("primary_column")} | covering_columns(geo)
        names = [n for n in pq.read_schema(part).names if n not in skip]
        df = pq.read_table(part, columns=names).to_pandas()
        if path.is_dir():  # read_table names each part's CRS
            df["crs"] = _crs_of(geo)
        frames.append(df)
    if not frames:
        return None
    return pd.concat(frames, ignore_index=True) if path.is_dir() else frames[0]


def _crs_of(geo: dict) -> str | None:
    col = geo.get("columns", {}).get(geo.get("primary_column"), {})
    if "crs" not in col:
        return "OGC:CRS84"  # GeoParquet: a missing crs means longitude/latitude
    return None if col["crs"] is None else parsed_crs(col["crs"]).to_string()
