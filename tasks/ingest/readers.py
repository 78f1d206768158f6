"""Reading a user's tables and vector files so that every problem names the file, the row and the reason.

IDs stay strings: CSVs are read with ``dtype=str`` and GeoJSON with GDAL's ``DATE_AS_STRING`` so an id
such as ``T0000`` is not turned into a time of day.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable, Collection, Iterator
from functools import lru_cache
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pyogrio
from pyproj import CRS, Transformer

from tasks.store.errors import InputError

VECTOR_SUFFIXES = {".parquet", ".geoparquet", ".gpkg", ".geojson", ".json", ".shp", ".fgb"}
BATCH_ROWS = 16_384  # rows of a vector file held at once by iter_vector_batches (~25 MiB of polygons)


def _check_utf8(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        row = data[: exc.start].count(b"\n")  # header is line 0, so this is the 1-based data row
        raise InputError(path, f"not UTF-8 text (byte {exc.start}: {exc.reason})", row=row) from None


def read_table_file(path: str | Path, rename: dict[str, str] | None = None, constants=None) -> pd.DataFrame:
    """Read CSV or Parquet with every column as text; apply the catalog's rename map."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            # Nullable dtypes: an integer id column with a gap stays integer (1 -> "1", not "1.0").
            df = pd.read_parquet(path, dtype_backend="numpy_nullable")
        except Exception as exc:
            raise InputError(path, f"unreadable Parquet: {exc}") from None
        for col in df.columns:
            if not str(df[col].dtype).startswith("datetime"):
                df[col] = df[col].astype("string").astype(object).where(df[col].notna(), None)
    else:
        text = _check_utf8(path, path.read_bytes())
        if not text.strip():
            raise InputError(path, "file is empty")
        try:
            df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_values=[""])
        except pd.errors.ParserError as exc:
            raise InputError(path, f"malformed CSV: {exc}") from None
    df = _rename(df, rename, path, constants)
    df.index = pd.RangeIndex(1, len(df) + 1)  # row numbers as a person counts them (after the header)
    return df


def _rename(df: pd.DataFrame, rename: dict[str, str] | None, path: Path, constants=None) -> pd.DataFrame:
    """Apply the catalog's ``columns`` map (pipeline name -> file name) and ``constants``."""
    if rename:
        missing = [src for src in rename.values() if src not in df.columns]
        if missing:
            raise InputError(
                path, f"columns {missing} named in the catalog's 'columns' map are not in the file"
            )
        df = df.rename(columns={src: dst for dst, src in rename.items()})
    for col, value in (constants or {}).items():
        if col in df.columns:
            raise InputError(path, f"column {col!r} is in the file and also given as a catalog constant")
        df[col] = value
    return df


def require_columns(df: pd.DataFrame, cols: list[str], path: str | Path) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise InputError(path, f"missing required columns {missing}; found {list(df.columns)}")


def require_ids(df: pd.DataFrame, cols: list[str], path: str | Path) -> None:
    """Every id is a non-empty string; name the first row that is not."""
    for col in cols:
        values = df[col]
        # over a plain object array: iterating an Arrow-backed column element by element costs ~10x more
        ok = np.array([isinstance(v, str) and v.strip() != "" for v in values.to_numpy(dtype=object)], bool)
        if not ok.all():
            row = values.index[~ok][0]
            v = values.loc[row]
            why = (
                "is empty"
                if v is None or (isinstance(v, float) and np.isnan(v)) or v == ""
                else (
                    f"was read as {type(v).__name__} {v!r}, not text "
                    "(a reader converted it; store ids as strings)"
                )
            )
            raise InputError(path, f"{col} {why}", row=row)


def require_unique(df: pd.DataFrame, cols: list[str], path: str | Path) -> None:
    dup = df.duplicated(cols, keep="first")
    if dup.any():
        row = df.index[dup.to_numpy()][0]
        key = ", ".join(f"{c}={df.loc[row, c]!r}" for c in cols)
        group = df.groupby(cols, sort=False, dropna=False).ngroup()
        first = df.index[(group == group.loc[row]).to_numpy()][0]  # earliest row with this same key
        raise InputError(path, f"duplicate {key} (first seen at row {first})", row=row)


def read_vector(path: str | Path, rename: dict[str, str] | None = None, constants=None) -> gpd.GeoDataFrame:
    """Read any vector format GDAL knows (GeoParquet through pyarrow); check CRS presence and plausibility."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    try:
        if path.suffix.lower() in (".parquet", ".geoparquet"):
            gdf = gpd.read_parquet(path)
        else:
            opts = {"DATE_AS_STRING": "YES"} if path.suffix.lower() in (".geojson", ".json") else {}
            gdf = pyogrio.read_dataframe(path, **opts)
    except Exception as exc:
        raise InputError(path, f"unreadable vector file: {exc}") from None
    gdf = _rename(gdf, rename, path, constants)
    gdf.index = pd.RangeIndex(1, len(gdf) + 1)
    if gdf.crs is None:
        raise InputError(path, "no CRS: the file declares no coordinate reference system")
    check_crs_plausible(gdf, path)
    return gdf


def iter_vector_batches(
    path: str | Path,
    rename: dict[str, str] | None = None,
    constants=None,
    batch_rows: int | None = None,
    sites: Collection[str] | None = None,
) -> Iterator[gpd.GeoDataFrame]:
    """The rows of a vector file in file order, ``batch_rows`` at a time, each batch as :func:`read_vector`
    gives the whole file: catalog renames applied, indexed by file row number (1-based), CRS present and
    plausible. A file without rows gives one empty batch. So a reader of a large label file holds one
    batch, not the file (at 100x the demo, the whole file read as polygons held ~440 MiB).

    ``sites``: only the rows whose ``site_id`` is one of these (file row numbers kept), picked before any
    geometry is decoded, so reading a few sites' rows again costs little more than the file's bytes (the
    label watcher, after a first pass found which sites changed); batches left without rows are skipped.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    start, crs, batch_rows = 1, None, batch_rows or BATCH_ROWS
    keep = _site_filter(sites, rename, constants)
    if _is_parquet(path):
        batches = _parquet_batches(path, batch_rows, keep)
    else:
        batches = _gdal_batches(path, batch_rows, keep)
    while True:
        try:
            read = next(batches, None)
        except Exception as exc:
            raise InputError(path, f"unreadable vector file: {exc}") from None
        if read is None:
            break
        n, gdf = read  # the batch's rows in the file; gdf: those kept, indexed by position in the batch
        gdf = _rename(gdf, rename, path, constants)
        gdf.index = (
            pd.Index(start + np.asarray(gdf.index, dtype="int64"))
            if keep
            else pd.RangeIndex(start, start + n)
        )
        if gdf.crs is None:
            raise InputError(path, "no CRS: the file declares no coordinate reference system")
        if crs is not None and gdf.crs != crs:  # one file, one CRS: a reader giving two is a bug
            raise InputError(path, f"CRS changes within the file at row {start}: {crs} then {gdf.crs}")
        crs = gdf.crs
        check_crs_plausible(gdf, path)
        start += n
        if len(gdf):
            yield gdf
    if start == 1:
        yield read_vector(path, rename, constants)


def _site_filter(sites, rename, constants) -> Callable[[pa.Table], np.ndarray] | None:
    """Positions of a batch's rows whose site id is in ``sites`` (None: keep every row)."""
    if sites is None:
        return None
    wanted = sorted({str(s) for s in sites})
    if "site_id" in (constants or {}):  # one site for the whole file
        every = str(constants["site_id"]) in wanted
        return lambda table: np.arange(table.num_rows if every else 0)
    column = (rename or {}).get("site_id", "site_id")

    def keep(table: pa.Table) -> np.ndarray:
        if column not in table.column_names:  # the full read reports the missing column
            return np.arange(table.num_rows)
        ids = table[column]
        if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)):
            ids = ids.cast(pa.string())
        mask = pc.is_in(ids, value_set=pa.array(wanted, ids.type))
        return np.flatnonzero(mask.to_numpy(zero_copy_only=False))

    return keep


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in (".parquet", ".geoparquet")


def _parquet_batches(path: Path, batch_rows: int, keep=None) -> Iterator[tuple[int, gpd.GeoDataFrame]]:
    """GeoParquet in record batches, decoded as ``geopandas.read_parquet`` decodes the whole file (WKB or
    native encodings, the spec's CRS default); its bbox covering columns are left out, as there. Yields
    (rows in the batch, the rows ``keep`` picks, indexed by position in the batch)."""
    # geopandas' own GeoParquet decoder: it has no public per-batch reader
    from geopandas.io.arrow import _arrow_to_geopandas

    # column chunks streamed through a 4 MiB buffer, not read whole (a 100x file: 88 -> 21 MiB held)
    pf = pq.ParquetFile(path, buffer_size=1 << 22, pre_buffer=False)
    meta = pf.schema_arrow.metadata or {}
    geo = json.loads(meta.get(b"geo", b"{}"))
    covering = {
        c["covering"]["bbox"]["xmin"][0]
        for c in geo.get("columns", {}).values()
        if isinstance(c.get("covering"), dict) and "bbox" in c["covering"]
    }
    columns = [n for n in pf.schema_arrow.names if n not in covering]
    for c in geo.get("columns", {}).values():  # each CRS parsed once, not per batch (~40 ms each)
        if isinstance(c.get("crs"), dict):
            c["crs"] = CRS.from_user_input(_without_member_ids(c["crs"]))
    for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
        table = pa.Table.from_batches([batch]).replace_schema_metadata(meta)
        yield _decoded(table, keep, lambda t: _arrow_to_geopandas(t, geo_metadata=geo if geo else None))


def _decoded(table: pa.Table, keep, decode) -> tuple[int, gpd.GeoDataFrame]:
    """(rows of ``table``, ``decode`` of the rows ``keep`` picks, indexed by their positions)."""
    if keep is None:
        return table.num_rows, decode(table)
    positions = keep(table)
    gdf = decode(table.take(pa.array(positions, pa.int64())))
    gdf.index = pd.Index(positions)
    return table.num_rows, gdf


def _without_member_ids(crs: dict) -> dict:
    """A PROJJSON CRS as geopandas reads it: datum ensemble members without their ids."""
    from geopandas.io.arrow import _remove_id_from_member_of_ensembles

    _remove_id_from_member_of_ensembles(crs)
    return crs


def _gdal_batches(path: Path, batch_rows: int, keep=None) -> Iterator[tuple[int, gpd.GeoDataFrame]]:
    """Any format GDAL reads, as an Arrow stream (ids kept as text in GeoJSON, as :func:`read_vector`);
    yields as :func:`_parquet_batches`."""
    opts = {"DATE_AS_STRING": "YES"} if path.suffix.lower() in (".geojson", ".json") else {}
    with pyogrio.open_arrow(path, batch_size=batch_rows, use_pyarrow=True, **opts) as (meta, reader):
        geometry = meta["geometry_name"] or "wkb_geometry"

        def decode(table: pa.Table) -> gpd.GeoDataFrame:
            df = table.drop_columns([geometry]).to_pandas()
            for col in df.columns[df.dtypes.map(pd.api.types.is_string_dtype)]:
                # as read_vector's reader gives them: text as Python objects, missing as None
                df[col] = df[col].astype(object).where(df[col].notna(), None)
            wkb = table[geometry].to_numpy(zero_copy_only=False)
            return gpd.GeoDataFrame(df, geometry=gpd.GeoSeries.from_wkb(wkb, crs=meta["crs"]).values)

        for batch in reader:
            yield _decoded(pa.Table.from_batches([batch]), keep, decode)


def check_crs_plausible(gdf: gpd.GeoDataFrame, path: str | Path) -> None:
    """Catch files whose declared CRS disagrees with their coordinates (e.g. metres labelled EPSG:4326)."""
    geoms = gdf.geometry
    valid = ~(geoms.isna() | geoms.is_empty)
    if not valid.any():
        return
    xmin, ymin, xmax, ymax = geoms[valid].total_bounds
    crs = CRS.from_user_input(gdf.crs)
    if crs.is_geographic:
        if xmin < -180.5 or xmax > 360.5 or ymin < -90.5 or ymax > 90.5:
            bad = geoms[valid].bounds
            row = bad.index[
                ((bad.minx < -180.5) | (bad.maxx > 360.5) | (bad.miny < -90.5) | (bad.maxy > 90.5))
            ][0]
            raise InputError(
                path,
                f"declared CRS {crs.to_string()} is geographic but coordinates reach "
                f"({xmin:.1f}, {ymin:.1f})–({xmax:.1f}, {ymax:.1f}); they look projected: the CRS is wrong",
                row=row,
            )
        return
    aou, to_geo = _area_of_use(crs, threading.get_ident())  # a PROJ transformer is not thread-safe
    if aou is None:
        return
    lon, lat = to_geo.transform([xmin, xmax, xmin, xmax], [ymin, ymin, ymax, ymax])
    lon, lat = np.asarray(lon), np.asarray(lat)
    margin = 5.0
    outside = (
        ~np.isfinite(lon).all()
        or lon.min() < aou.west - margin
        or lon.max() > aou.east + margin
        or lat.min() < aou.south - margin
        or lat.max() > aou.north + margin
    )
    if outside:
        raise InputError(
            path,
            f"coordinates fall outside the area of use of the declared CRS {crs.to_string()} "
            f"({aou.name}); the CRS is probably wrong",
        )


@lru_cache(maxsize=64)
def _area_of_use(crs: CRS, thread: int) -> tuple:
    """(area of use, transformer to lon/lat) of a CRS, made once per thread: a file read in batches
    checks each batch (PROJ takes tens of ms to build them)."""
    aou = crs.area_of_use
    return aou, (Transformer.from_crs(crs, 4326, always_xy=True) if aou is not None else None)
