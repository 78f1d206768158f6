"""Arrow tables with GeoParquet metadata → GeoDataFrames, as ``geopandas.read_parquet`` builds them, with
each distinct CRS parsed once per process.

PROJ takes ~15 ms to parse a PROJJSON CRS (the form GeoParquet stores), more than reading one batch's rows
of a table; a version's tables share a handful of CRSs, and a reprocess reads a hundred small slices.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import geopandas as gpd
import pyarrow as pa
import pyarrow.parquet as pq
from geopandas.io.arrow import (
    _arrow_to_geopandas,
    _remove_id_from_member_of_ensembles,
    _validate_and_decode_metadata,
)
from pyproj import CRS


@lru_cache(maxsize=64)
def _parsed(text: str, is_json: bool) -> CRS:
    return CRS.from_json(text) if is_json else CRS.from_user_input(text)


def parsed_crs(crs: dict | str | None) -> CRS | None:
    """A GeoParquet column's ``crs`` value (PROJJSON dict, a CRS string, or None) as a CRS, cached by content.
    pyproj CRS objects are thread-safe (3.1+), so one cached object serves every thread."""
    if crs is None:
        return None
    if isinstance(crs, dict):
        crs = dict(crs)
        _remove_id_from_member_of_ensembles(crs)  # what geopandas does before parsing
        return _parsed(json.dumps(crs, sort_keys=True), True)
    return _parsed(str(crs), False)


def geo_metadata(schema: pa.Schema) -> dict:
    return json.loads((schema.metadata or {}).get(b"geo", b"{}"))


def covering_columns(geo: dict) -> set[str]:
    """The GeoParquet 1.1 bbox covering columns (``gpd.read_parquet`` leaves them out of its frame)."""
    return {
        spec[0]
        for col in geo.get("columns", {}).values()
        for cov in (col.get("covering") or {}).values()
        for spec in cov.values()
        if isinstance(spec, list) and spec
    }


def geo_frame(table: pa.Table) -> gpd.GeoDataFrame:
    """``table`` (read from GeoParquet, schema metadata kept) as the GeoDataFrame geopandas makes of it."""
    geo = _validate_and_decode_metadata(table.schema.metadata)
    for col in geo["columns"].values():
        # a missing crs means OGC:CRS84 (GeoParquet); null means unknown
        col["crs"] = parsed_crs(col["crs"]) if "crs" in col else parsed_crs("OGC:CRS84")
    return _arrow_to_geopandas(table, geo)


def read_geoparquet(path: str | Path, columns: list[str] | None = None, filters=None) -> gpd.GeoDataFrame:
    """``gpd.read_parquet(path, columns=..., filters=...)`` for one file, with the cached CRS."""
    schema = pq.read_schema(path)
    if columns is None:
        skip = covering_columns(geo_metadata(schema))
        columns = [n for n in schema.names if n not in skip]
    return geo_frame(pq.read_table(path, columns=columns, filters=filters, use_pandas_metadata=True))
