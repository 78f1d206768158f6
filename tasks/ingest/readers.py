"""Reading a user's tables and vector files so that every problem names the file, the row and the reason.

IDs stay strings: CSVs are read with ``dtype=str`` and GeoJSON with GDAL's ``DATE_AS_STRING`` so an id
such as ``T0000`` is not turned into a time of day.
"""

from __future__ import annotations

import io
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
from pyproj import CRS, Transformer

from tasks.store.errors import InputError

VECTOR_SUFFIXES = {".parquet", ".geoparquet", ".gpkg", ".geojson", ".json", ".shp", ".fgb"}


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
    aou = crs.area_of_use
    if aou is None:
        return
    to_geo = Transformer.from_crs(crs, 4326, always_xy=True)
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
