"""Per-batch reads that keep a task's memory independent of the region's size (consensus and learn batches).

A batch needs its own sites' polygons from the ``labels`` folder (one GeoParquet part per CRS). A Parquet
``filters`` read goes through Arrow's dataset scanner, which reads ahead several row groups at once and,
on a part written as one row group (versions from before row groups were used), decodes every site's
polygons before keeping the batch's (~18 MiB of Arrow buffers at 10x the demo, two tasks in flight).
Here only the row groups whose ``site_id`` statistics can hold the batch's sites are read, one record
batch of ``STREAM_ROWS`` at a time, so the working set is bounded by that, not by the region.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.store.geoparquet import covering_columns, geo_frame, geo_metadata

STREAM_ROWS = 8192


def _row_groups(pf: pq.ParquetFile, ids: list[str]) -> list[int]:
    """Row groups whose site_id min/max statistics overlap ``ids`` (all of them when unknown)."""
    meta = pf.metadata
    col = pf.schema_arrow.get_field_index("site_id")
    keep = []
    for g in range(meta.num_row_groups):
        st = meta.row_group(g).column(col).statistics
        if st is None or not st.has_min_max:
            keep.append(g)
            continue
        lo, hi = str(st.min), str(st.max)
        if any(lo <= s <= hi for s in ids):
            keep.append(g)
    return keep


def _batch_rows(
    part: Path | pq.ParquetFile, site_ids: list[str], wanted: list[str] | None = None
) -> pa.Table:
    """The rows of ``part`` whose ``site_id`` is in ``site_ids``, read one record batch at a time (the
    ``wanted`` columns and ``site_id``, else all but the bbox covering)."""
    pf = part if isinstance(part, pq.ParquetFile) else pq.ParquetFile(part)
    covering = covering_columns(geo_metadata(pf.schema_arrow))  # gpd.read_parquet leaves them out too
    columns = [
        n
        for n in pf.schema_arrow.names
        if n not in covering and (wanted is None or n in wanted or n == "site_id")
    ]
    schema = pa.schema([pf.schema_arrow.field(n) for n in columns], metadata=pf.schema_arrow.metadata)
    value_set = pa.array(site_ids, type=pa.string()).cast(schema.field("site_id").type)
    groups = _row_groups(pf, site_ids)
    keep = []
    if groups:
        batches = pf.iter_batches(
            batch_size=STREAM_ROWS, row_groups=groups, columns=columns, use_pandas_metadata=True
        )
        for rb in batches:
            mask = pc.is_in(rb.column("site_id"), value_set=value_set)
            if pc.any(mask).as_py():
                keep.append(rb.filter(mask))
    return pa.Table.from_batches(keep, schema=schema) if keep else schema.empty_table()


def read_site_rows(
    path: str | Path, site_ids: Iterable[str], columns: list[str] | None = None
) -> pd.DataFrame:
    """Rows of a native-CRS table folder (``read_table`` layout: shapely geometries, a ``crs`` column)
    belonging to ``site_ids``; equal to ``read_table(path, filters=[("site_id", "in", ...)])``. With
    ``columns`` (naming the geometry), only those and ``crs``. A filtered ``read_table`` reads and converts
    every part, holding the sites or not: with a part per 64 sites, a batch's read grew with the region
    (label_issues' 100 sites: 1.8 s among the 125 parts of 100x the demo, 0.14 s at 10x)."""
    ids = sorted({str(s) for s in site_ids})
    parts = sorted(Path(path).glob("*.parquet"))
    # a part whose row-group statistics cannot hold one of the sites costs a footer read, not a conversion
    # (a folder of many parts of a few sites each); the first part gives an empty result its columns
    files = [pq.ParquetFile(part) for part in parts]  # each footer read once
    holding = [pf for pf in files if _row_groups(pf, ids)]
    frames = []
    for pf in holding or files[:1]:
        gdf = geo_frame(_batch_rows(pf, ids, columns))
        df = pd.DataFrame(gdf)
        if columns is not None:
            df = df[[c for c in columns if c in df.columns]]
        df[gdf.geometry.name] = pd.Series(gdf.geometry.to_numpy(), index=df.index, dtype=object)
        df["crs"] = gdf.crs.to_string() if gdf.crs is not None else None
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
