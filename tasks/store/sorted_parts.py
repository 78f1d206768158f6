"""Native-CRS GeoParquet parts written from streams of row chunks in key order, in O(row group) memory.

A table that is too big to hold whole (``label_issues`` on a large region) is written by its producers in
pieces, each sorted by the table's key and in the layout ``write_table`` writes (WKB geometry and a
``bbox`` covering); this module merges such pieces (and the rows a new version takes over from the
previous one's parts) into one part per CRS, one row group at a time. The parts record their sort order
(Parquet ``sorting_columns``), so a reader filtering by site skips the row groups of other sites and a
later version can stream them again; the GeoParquet metadata that depends on every row (bbox, geometry
types) is put in the footer when the part is closed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.store.artifacts import ROW_GROUP_ROWS, file_hash, unshare
from tasks.store.geoparquet import geo_metadata

BBOX = pa.struct([(k, pa.float64()) for k in ("xmin", "ymin", "xmax", "ymax")])
_WKB_TYPES = ("Point", "LineString", "Polygon", "MultiPoint", "MultiLineString", "MultiPolygon",
              "GeometryCollection")  # fmt: skip


def wkb_type_names(wkb: pa.Array | pa.ChunkedArray) -> list[str | None]:
    """Each ISO WKB value's GeoParquet geometry type, as geopandas names them (" Z" when 3D)."""
    names: dict[bytes, str] = {}
    out = []
    for head in pc.binary_slice(wkb, 0, 5).to_pylist():
        if head is None:
            out.append(None)
            continue
        if head not in names:
            code = int.from_bytes(head[1:5], "little" if head[0] == 1 else "big")
            base, dim = code % 1000, code // 1000
            if not 1 <= base <= 7 or dim > 3:
                raise ValueError(f"unexpected WKB geometry type {code}")
            names[head] = _WKB_TYPES[base - 1] + (" Z" if dim in (1, 3) else "")
        out.append(names[head])
    return out


def wkb_types(wkb: pa.Array | pa.ChunkedArray) -> set[str]:
    """The set of ``wkb_type_names``: a GeoParquet column's ``geometry_types``."""
    return {n for n in wkb_type_names(wkb) if n is not None}


def is_streamable(path: str | Path, sort_columns: Sequence[str]) -> bool:
    """Whether a part was written sorted by ``sort_columns`` with WKB ``geometry`` and a ``bbox`` covering
    (what :class:`SortedPartWriter` writes), so its rows can be streamed into a new part."""
    pf = pq.ParquetFile(path)
    schema = pf.schema_arrow
    if "geometry" not in schema.names or "bbox" not in schema.names:
        return False
    if (schema.field("geometry").type, schema.field("bbox").type) != (pa.binary(), BBOX):
        return False
    want = tuple((c, "ascending") for c in sort_columns)
    meta = pf.metadata
    for i in range(meta.num_row_groups):
        sorting = meta.row_group(i).sorting_columns
        if not sorting or pq.SortingColumn.to_ordering(schema, sorting)[0] != want:
            return False
    return True


def iter_rows(
    path: str | Path, keep: pa.Array | None = None, column: str = "site_id", columns: list[str] | None = None
) -> Iterator[pa.Table]:
    """A part's rows a row group at a time (only those whose ``column`` is in ``keep``, when given)."""
    pf = pq.ParquetFile(path)
    for i in range(pf.metadata.num_row_groups):
        t = pf.read_row_group(i, columns=columns)
        if keep is not None:
            t = t.filter(pc.is_in(t[column], value_set=keep))
        if t.num_rows:
            yield t


def chain(streams: Iterable[Iterator[pa.Table]]) -> Iterator[pa.Table]:
    for s in streams:
        yield from s


def merge_sorted(sources: Sequence[Iterator[pa.Table]], key: str) -> Iterator[pa.Table]:
    """The rows of several streams, each sorted by ``key`` and no ``key`` value in two of them, as one
    stream in ``key`` order (runs of rows are passed on as slices: nothing is copied row by row).
    Raise ``ValueError`` when a stream is out of order or two share a value."""

    def advance(stream: Iterator[pa.Table], last) -> list | None:
        for t in stream:
            if not t.num_rows:
                continue
            keys = np.asarray(t.column(key).to_pylist(), dtype=object)
            if (last is not None and keys[0] < last) or bool((keys[1:] < keys[:-1]).any()):
                raise ValueError(f"rows not sorted by {key} (at {keys[0]!r})")
            return [t, keys, 0, stream]
        return None

    heads = [h for h in (advance(iter(s), None) for s in sources) if h is not None]
    while len(heads) > 1:
        i = min(range(len(heads)), key=lambda k: heads[k][1][heads[k][2]])
        t, keys, off, stream = heads[i]
        bound = min(h[1][h[2]] for k, h in enumerate(heads) if k != i)
        end = int(np.searchsorted(keys, bound, side="left"))  # first row at or past the others' next
        if end < len(keys) and keys[end] == bound:
            raise ValueError(f"{key} {bound!r} is in two of the merged streams")
        yield t.slice(off, end - off)
        if end < len(keys):
            heads[i][2] = end
        else:
            heads[i] = advance(stream, keys[-1])
            if heads[i] is None:
                heads.pop(i)
    if heads:
        t, keys, off, stream = heads[0]
        yield t.slice(off)
        while (head := advance(stream, keys[-1])) is not None:
            t, keys = head[0], head[1]
            yield t


@dataclass
class GeoExtent:
    """What a GeoParquet column's metadata says of all its rows: bbox (from the covering) and geometry
    types. Producers of a part's pieces report theirs, so the part's metadata is known before writing."""

    bounds: tuple[float, float, float, float] = (np.inf, np.inf, -np.inf, -np.inf)
    types: frozenset[str] = frozenset()

    @classmethod
    def of(cls, table: pa.Table) -> GeoExtent:
        """The extent of rows in the written layout (WKB ``geometry``, ``bbox`` covering)."""
        fields = [pc.struct_field(table["bbox"], k) for k in ("xmin", "ymin", "xmax", "ymax")]
        bounds = np.column_stack([f.to_numpy(zero_copy_only=False).astype(float) for f in fields])
        return cls.of_rows(bounds.reshape(-1, 4), wkb_types(table["geometry"]))

    @classmethod
    def of_rows(cls, bounds: np.ndarray, types: Iterable[str | None]) -> GeoExtent:
        """The extent of rows with these (n, 4) bounds and geometry types (NaN bounds: empty rows)."""
        b = np.asarray(bounds, float).reshape(-1, 4)
        finite = np.isfinite(b).all(axis=1)
        if not finite.any():
            return cls(types=frozenset(t for t in types if t is not None))
        lo, hi = b[finite, :2].min(axis=0), b[finite, 2:].max(axis=0)
        return cls((*map(float, lo), *map(float, hi)), frozenset(t for t in types if t is not None))

    def __or__(self, other: GeoExtent) -> GeoExtent:
        b = (*np.minimum(self.bounds[:2], other.bounds[:2]), *np.maximum(self.bounds[2:], other.bounds[2:]))
        return GeoExtent(tuple(float(v) for v in b), self.types | other.types)

    def metadata(self, schema: pa.Schema) -> dict:
        """``schema``'s ``geo`` metadata with this extent's bbox and geometry types (geopandas' key order)."""
        geo = geo_metadata(schema)
        meta = {}
        for key, value in geo["columns"][geo["primary_column"]].items():
            if key == "geometry_types":
                meta[key] = sorted(self.types)
                if np.isfinite(self.bounds).all():
                    meta["bbox"] = list(self.bounds)
            elif key != "bbox":
                meta[key] = value
        geo["columns"][geo["primary_column"]] = meta
        return geo


class SortedPartWriter:
    """One GeoParquet part written from chunks already in ``sort_columns`` order, ``ROW_GROUP_ROWS`` rows
    to a row group (as ``write_table`` groups them). ``schema``: the part's columns, types and metadata
    (GeoParquet skeleton included); each chunk is cast to it. ``extent``: the bbox and geometry types of
    all the rows to come (the metadata is written first); ``close`` checks that they were, and returns the
    file's content hash."""

    def __init__(self, path: str | Path, schema: pa.Schema, sort_columns: Sequence[str], extent: GeoExtent):
        self.path = unshare(path)
        geo = json.dumps(extent.metadata(schema)).encode("utf-8")
        self.schema = schema.with_metadata(dict(schema.metadata or {}) | {b"geo": geo})
        self.extent, self.rows = extent, 0
        self._seen = GeoExtent()
        self._pending: list[pa.Table] = []
        self._n_pending = 0
        sorting = pq.SortingColumn.from_ordering(schema, [(c, "ascending") for c in sort_columns])
        self._writer = pq.ParquetWriter(self.path, self.schema, compression="zstd", sorting_columns=sorting)

    def write(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        table = table.select(self.schema.names).cast(self.schema)
        self._seen = self._seen | GeoExtent.of(table)
        self._pending.append(table)
        self._n_pending += table.num_rows
        self.rows += table.num_rows
        while self._n_pending >= ROW_GROUP_ROWS:
            self._flush(ROW_GROUP_ROWS)

    def _flush(self, n: int) -> None:
        table = pa.concat_tables(self._pending)
        self._writer.write_table(table.slice(0, n), row_group_size=n)
        rest = table.slice(n)
        self._pending, self._n_pending = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> str:
        if self._n_pending:
            self._flush(self._n_pending)
        self._writer.close()
        if self._seen != self.extent:
            self.path.unlink()
            raise ValueError(f"{self.path}: rows' extent {self._seen} is not the announced {self.extent}")
        return file_hash(self.path)

    def abort(self) -> None:
        self._writer.close()
        self.path.unlink(missing_ok=True)
