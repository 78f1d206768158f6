"""Where the raw label rows wait between reading the label file and normalising them part by part.

The file is read a batch at a time (``readers.iter_vector_batches``) and each validated batch is handed to
one of these: :class:`SpilledRows` writes them to disk in buckets of sites (ingest), so the stage task holds
one batch of the file whatever its size (at 100x the demo the whole file as polygons held ~440 MiB), and
each part's task reads back only the buckets of its own sites; :class:`FileRows` keeps nothing and reads
the file again for the few sites asked (the label watcher).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import shapely

SPILL_SITES = 256  # sites per spill bucket: a 64-site labels part reads one or two buckets
ROW_COLUMNS = ["site_id", "labeller_id", "label"]  # what normalisation reads besides the geometry


@dataclass(frozen=True)
class SpilledSites:
    """The spill files holding some sites' rows, read where the work runs (it travels to a Dask worker):
    reading them costs those buckets, not the file."""

    files: tuple[str, ...]
    sites: frozenset[str]
    crs: Any

    def read(self) -> gpd.GeoDataFrame:
        frames = []
        for f in self.files:
            t = pq.read_table(f)
            t = t.filter(pc.is_in(t["site_id"], pa.array(sorted(self.sites), t["site_id"].type)))
            if t.num_rows:
                frames.append(t)
        if not frames:
            return _empty_rows(self.crs)
        table = pa.concat_tables(frames, promote_options="permissive")  # a chunk of only None may be null
        df = table.drop_columns(["row", "wkb"]).to_pandas()
        df.index = pd.Index(table["row"].to_numpy(), name=None)
        geometry = shapely.from_wkb(table["wkb"].to_numpy(zero_copy_only=False))
        return gpd.GeoDataFrame(df, geometry=geometry, crs=self.crs)


def _empty_rows(crs) -> gpd.GeoDataFrame:
    return gpd.GeoDataFrame({c: pd.Series(dtype=object) for c in ROW_COLUMNS}, geometry=[], crs=crs)


class LabelFileChanged(RuntimeError):
    """The label file changed between the read that keyed its rows and a later read of some sites' rows:
    the two reads would mix two versions of the file (read it all again)."""


class FileRows:
    """No rows kept: :meth:`rows_of` reads the file again for the asked sites' rows. For the label watcher,
    which normalises only the few sites whose key moved: a poll holds one batch and writes nothing, and
    when something changed the second read decodes only those sites' geometries. The file's identity
    (inode, size, modification time) is taken before the first read; a second read of a file that has
    changed since raises :class:`LabelFileChanged` instead of mixing versions."""

    def __init__(self, path: str | Path, read: Callable[[set[str]], Iterable[gpd.GeoDataFrame]]) -> None:
        self.path = Path(path)
        self._read = read  # the validated rows of the given sites, a batch at a time, from the start
        self._stamp = _file_stamp(self.path)

    def add(self, batch: gpd.GeoDataFrame, wkb: np.ndarray) -> None:
        pass

    def rows_of(self, site_ids: Iterable[str]) -> gpd.GeoDataFrame:
        """The raw rows of ``site_ids`` in file order (file row numbers as index)."""
        sites, crs, frames = set(site_ids), None, []
        if not sites:
            return _empty_rows(crs)
        self._require_unchanged()
        for batch in self._read(sites):
            crs = batch.crs if crs is None else crs
            if len(batch):
                frames.append(batch)
        self._require_unchanged()  # also not while it was read
        return pd.concat(frames) if frames else _empty_rows(crs)

    def _require_unchanged(self) -> None:
        if _file_stamp(self.path) != self._stamp:
            raise LabelFileChanged(f"{self.path} changed while it was read")


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class SpilledRows:
    """Validated batches spilled to ``folder`` in buckets of ``SPILL_SITES`` sites, one Parquet file per
    batch and bucket (row number, ids, class, WKB). A bucket holds consecutive sites of one CRS in the
    order the labels parts take them (``label_parts``), so a part's sites share one or two buckets.
    The folder must be reachable from the workers that normalise the parts (it sits in the draft)."""

    def __init__(self, folder: Path, grids: pd.DataFrame) -> None:
        self.folder = Path(folder)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        self.crs = None
        self._bucket_of = _buckets(grids)
        self._files: dict[str, list[str]] = {}
        self._batches = 0

    def add(self, batch: gpd.GeoDataFrame, wkb: np.ndarray) -> None:
        """Spill the next rows of the file; ``wkb``: their geometries (``label_keys.row_wkb``)."""
        if not len(batch):
            return
        self.crs = batch.crs if self.crs is None else self.crs
        n, self._batches = self._batches, self._batches + 1
        bucket = batch["site_id"].map(self._bucket_of).to_numpy()
        for name in sorted(set(bucket)):
            mine = bucket == name
            rows = batch[mine]
            table = pa.table(
                {
                    "row": pa.array(rows.index.to_numpy(), pa.int64()),
                    **{c: pa.array(_missing_as_none(rows[c])) for c in ROW_COLUMNS},
                    "wkb": pa.array(wkb[mine], pa.binary()),
                }
            )
            path = self.folder / f"{name}-{n:06d}.parquet"
            pq.write_table(table, path, compression="lz4")
            self._files.setdefault(name, []).append(str(path))

    def source(self, site_ids: Iterable[str]) -> SpilledSites:
        sites = frozenset(site_ids)
        names = sorted({self._bucket_of[s] for s in sites if s in self._bucket_of})
        return SpilledSites(tuple(f for b in names for f in self._files.get(b, [])), sites, self.crs)

    def rows_of(self, site_ids: Iterable[str]) -> gpd.GeoDataFrame:
        return self.source(site_ids).read()


def _missing_as_none(values: pd.Series) -> np.ndarray:
    values = values.astype(object)
    return values.where(values.notna(), None).to_numpy()


def _buckets(grids: pd.DataFrame) -> dict[str, str]:
    """Site -> bucket name: per CRS, sites in polygon-id order (``site + "/"``), ``SPILL_SITES`` a bucket."""
    out: dict[str, str] = {}
    for k, (_, part) in enumerate(grids.groupby(grids["crs"].astype(str))):
        ids = sorted(part["site_id"].astype(str), key=lambda s: s + "/")
        for i, s in enumerate(ids):
            out[s] = f"crs{k:03d}-{i // SPILL_SITES:05d}"
    return out
