"""GeoParquet CRS metadata: parsed once per process when read, spelled the same by every writer.

PROJ takes ~15 ms to parse a PROJJSON CRS (the form GeoParquet stores), more than reading one batch's rows
of a table; a version's tables share a handful of CRSs, and a reprocess reads a hundred small slices.
"""

from __future__ import annotations

import copy
import json
import threading
from concurrent.futures import ThreadPoolExecutor
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


_DEFINITIONS: dict[str, tuple[dict, dict]] = {}
_DEFINITIONS_LOCK = threading.Lock()


def crs_projjson(crs: str) -> dict:
    """The PROJJSON a GeoParquet file of CRS ``crs`` (text: "EPSG:32630", WKT, ...) carries, as geopandas
    writes it (ensemble members without ids), and the same whichever thread or process asks.

    pyproj gives each thread its own PROJ context, and threads of long-lived Dask workers have been seen,
    after a refresh ran through them, to build authority codes from PROJ's database without their datum
    ensemble (EPSG:32630 and EPSG:4326 came back with a plain WGS 84 ``datum``, as if read from WKT1),
    while a new thread of the same process, and every fresh process, built the ensemble; parsing a
    PROJJSON text stayed right in those threads. Files written with the writing thread's definition then
    changed bytes with the worker's history, and every key hashed from them with it (a one-site reprocess
    recomputed all sites). So the definition is built once per process in a new thread (a new context)
    and every writer uses that text."""
    return copy.deepcopy(_definitions(crs)[0])


def _definitions(crs: str) -> tuple[dict, dict]:
    """(GeoParquet PROJJSON, GeoArrow field PROJJSON) of ``crs``, built once per process in a new thread."""
    with _DEFINITIONS_LOCK:
        if crs not in _DEFINITIONS:
            with ThreadPoolExecutor(1, thread_name_prefix="crs-definition") as pool:
                _DEFINITIONS[crs] = pool.submit(_fresh_projjson, crs).result()
        return _DEFINITIONS[crs]


def _fresh_projjson(crs: str) -> tuple[dict, dict]:
    full = CRS.from_user_input(crs).to_json_dict()  # what geopandas puts in the GeoArrow field metadata
    out = copy.deepcopy(full)
    _remove_id_from_member_of_ensembles(out)  # what geopandas writes in the GeoParquet metadata
    return out, full


def with_crs(table: pa.Table, crs: str | None) -> pa.Table:
    """``table`` (GeoParquet metadata from geopandas) with its primary geometry column's CRS spelled by
    :func:`crs_projjson` (None: unknown CRS, written as null), in the file's ``geo`` metadata and in the
    column's GeoArrow extension metadata (geopandas spells both in the writing thread)."""
    geo = geo_metadata(table.schema)
    name = geo["primary_column"]
    geo["columns"][name]["crs"] = None if crs is None else crs_projjson(crs)
    metadata = dict(table.schema.metadata) | {b"geo": json.dumps(geo).encode("utf-8")}
    table = table.replace_schema_metadata(metadata)
    index = table.schema.get_field_index(name)
    field = table.schema.field(index)
    ext = dict(field.metadata or {})
    if crs is not None and b"ARROW:extension:metadata" in ext:
        ext[b"ARROW:extension:metadata"] = json.dumps({"crs": copy.deepcopy(_definitions(crs)[1])}).encode()
        table = table.set_column(index, field.with_metadata(ext), table.column(index))
    return table


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
