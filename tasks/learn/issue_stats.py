"""The ``label_issue_stats`` folder: each scored site's pixel histogram, the exact sum of them all, and
the pooled histogram the fit in use came from, laid out so that a reprocess reads and writes only what
changed.

* ``part-<index>-<key>.parquet`` -- the sites in site order, ``stats_part_sites`` to a part; the key
  hashes the part's (site, input key) pairs, so an unchanged part is the previous version's file, linked.
* ``pooled.parquet`` -- unit ``*`` (the pooled histogram in use) and unit ``+`` (the sum of every site's).

A reprocess learns which sites' histograms it can keep from the parts' key columns alone, and gets the new
sum as the previous ``+`` minus the histograms that left (sites changed or gone) plus the new ones: integer
counts, so the result is the sum a full recompute adds up, to the count, without reading every histogram.

Histograms are never all in memory at once (sparse, ~130 KB a site at the default 16,384 bins: 1.6 GB for
the 12,800 sites of 100x the demo): the pass-1 batches write theirs to staged pieces
(:func:`stage_hists`), and parts are assembled one at a time from those pieces and the previous parts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.learn.pixel_issues import PixelStats
from tasks.store.artifacts import write_table
from tasks.store.folders import folder_record, previous_record
from tasks.store.reuse import Reuse, content_key, link_or_copy

POOLED = "*"  # unit of the pooled histogram in use
TOTAL = "+"  # unit of the exact sum of every scored site's histogram
POOLED_PART = "pooled.parquet"
COLUMNS = ["unit_id", "key", "n_bins", "n_pixels", "cells", "counts"]

Hist = tuple[bytes, bytes, int]  # (cells, counts, n_pixels) as PixelStats.encode gives them, and the total
Row = tuple[str, int, bytes, bytes]  # (key, n_bins, cells, counts) of a stored unit


def sum_encoded(n_bins: int, hists: Iterable[tuple[bytes, bytes, int]]) -> PixelStats:
    """The sum of many ``PixelStats.encode`` histograms in one pass (exact: integer counts)."""
    hists = list(hists)
    flat = np.zeros(2 * n_bins, np.int64)
    if hists:
        cells = np.frombuffer(b"".join(h[0] for h in hists), "<u4").astype(np.intp)
        np.add.at(flat, cells, np.frombuffer(b"".join(h[1] for h in hists), "<i8"))
    return PixelStats(flat.reshape(2, n_bins))


def _parts(folder: Path | None) -> list[Path]:
    return sorted(folder.glob("part-*.parquet")) if folder is not None and folder.is_dir() else []


def read_rows(paths: Iterable[Path], unit_ids: Iterable[str] | None = None) -> dict[str, Row]:
    """unit_id -> (key, n_bins, cells, counts) of the given units (row filters), or of every unit, in the
    given files."""
    ids = None if unit_ids is None else sorted(set(unit_ids))
    if ids is not None and not ids:
        return {}
    out = {}
    for path in paths:
        if not path.is_file():
            continue
        rows = pq.read_table(path, filters=None if ids is None else [("unit_id", "in", ids)]).to_pylist()
        for r in rows:
            out[r["unit_id"]] = (r["key"], int(r["n_bins"]), bytes(r["cells"]), bytes(r["counts"]))
    return out


@dataclass
class PreviousStats:
    """What the previous version's folder says: each site's (input key, n_bins) and part, read without the
    histograms, and its ``*`` and ``+`` rows."""

    folder: Path | None = None
    version_dir: Path | None = None
    index: dict[str, tuple[str, int]] = field(default_factory=dict)
    pooled: Row | None = None
    total: Row | None = None
    where: dict[str, Path] = field(default_factory=dict)  # site -> the part file holding its row
    _units: dict[Path, set[str]] = field(default_factory=dict)

    @classmethod
    def read(cls, reuse: Reuse, uri: str) -> PreviousStats:
        if reuse.previous is None or not (reuse.previous / uri).is_dir():
            return cls()
        folder = reuse.previous / uri
        index, where = {}, {}
        if reuse.enabled:
            for path in _parts(folder):
                t = pq.read_table(path, columns=["unit_id", "key", "n_bins"])
                pairs = zip(t["key"].to_pylist(), t["n_bins"].to_pylist(), strict=True)
                units = t["unit_id"].to_pylist()
                index.update(zip(units, pairs, strict=True))
                where.update(dict.fromkeys(units, path))
        pooled = read_rows([folder / POOLED_PART], [POOLED, TOTAL])
        return cls(folder, reuse.previous, index, pooled.get(POOLED), pooled.get(TOTAL), where)

    def rows(self, unit_ids: Iterable[str]) -> dict[str, Row]:
        """Stored rows of the given sites (the parts holding them, each read once)."""
        ids = set(unit_ids)
        return {s: r for part in self._by_part(ids) for s, r in part.items()}

    def _by_part(self, ids: set[str]) -> Iterable[dict[str, Row]]:
        """The stored rows of ``ids``, one part's at a time (only those held at once)."""
        for path in sorted({self.where[s] for s in ids if s in self.where}):
            yield read_rows([path], sorted(ids & self._units_of(path)))

    def _units_of(self, path: Path) -> set[str]:
        if not self._units:
            for s, p in self.where.items():
                self._units.setdefault(p, set()).add(s)
        return self._units.get(path, set())

    def reusable(self, inputs: Mapping[str, str], n_bins: int) -> set[str]:
        """Sites whose histogram is stored under the same input key and number of bins."""
        return {s for s, k in inputs.items() if self.index.get(s) == (k, n_bins)}

    def total_with(self, kept: set[str], fresh: PixelStats, n_bins: int) -> PixelStats:
        """Sum of the ``kept`` sites' stored histograms plus ``fresh``: the stored sum minus the sites that
        left it when that is fewer reads, else the kept ones added up (a part at a time)."""
        if not kept:
            return fresh
        left = {s for s in self.index if s not in kept}
        if self.total is not None and self.total[1] == n_bins and len(left) < len(kept):
            stored = PixelStats.decode(n_bins, self.total[2], self.total[3])
            return PixelStats(stored.hist - self._sum(left, n_bins).hist + fresh.hist)
        return self._sum(kept, n_bins) + fresh

    def _sum(self, ids: set[str], n_bins: int) -> PixelStats:
        total = PixelStats.zeros(n_bins)
        for rows in self._by_part(ids):
            total = total + sum_encoded(n_bins, _hists(rows))
        return total


@dataclass(frozen=True)
class StagedHists:
    """This run's fresh per-site histograms, left by the pass-1 batches in staged pieces (site -> piece)
    rather than held: :meth:`rows` reads the pieces holding the sites asked."""

    where: Mapping[str, str] = field(default_factory=dict)

    def __contains__(self, site_id: object) -> bool:
        return site_id in self.where

    def __len__(self) -> int:
        return len(self.where)

    def rows(self, site_ids: Iterable[str]) -> dict[str, Hist]:
        """The staged histograms of those of ``site_ids`` this run computed."""
        ids = sorted({s for s in site_ids if s in self.where})
        out: dict[str, Hist] = {}
        for piece in sorted({self.where[s] for s in ids}):
            t = pq.read_table(piece, filters=[("unit_id", "in", ids)])
            for r in t.to_pylist():
                out[r["unit_id"]] = (bytes(r["cells"]), bytes(r["counts"]), int(r["n_pixels"]))
        return out


def stage_hists(hists: Mapping[str, Hist], staging: str | Path, index: int) -> dict[str, str]:
    """Write one batch's site histograms to piece ``index`` of ``staging``; site -> the piece's path."""
    if not hists:
        return {}
    path = Path(staging) / f"hists-{index:05d}.parquet"
    ids = list(hists)
    table = pa.table(
        {
            "unit_id": pa.array(ids, pa.string()),
            "cells": pa.array([hists[s][0] for s in ids], pa.binary()),
            "counts": pa.array([hists[s][1] for s in ids], pa.binary()),
            "n_pixels": pa.array([hists[s][2] for s in ids], pa.int64()),
        }
    )
    pq.write_table(table, path, compression="lz4")
    return dict.fromkeys(ids, str(path))


def _hists(rows: Mapping[str, Row]) -> list[Hist]:
    return [(r[2], r[3], 0) for r in rows.values()]


def _frame(rows: list[tuple]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=COLUMNS)
    return df.astype({"n_bins": np.int64, "n_pixels": np.int64})


def write_stats(
    folder: Path,
    uri: str,
    inputs: Mapping[str, str],
    fresh: StagedHists,
    prev: PreviousStats,
    pooled: PixelStats,
    total: PixelStats,
    n_bins: int,
    part_sites: int,
) -> dict:
    """Write the folder (sites of ``inputs``: histograms from ``fresh``, else the previous version's rows)
    and return its manifest record. A part whose name the previous version has is linked from there; the
    others are assembled one at a time, so only one part's histograms are held."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.parquet"):  # an earlier attempt's parts (a retried task)
        stale.unlink()
    ids = sorted(inputs)
    chunks = [ids[i : i + part_sites] for i in range(0, len(ids), part_sites)]
    names = [
        f"part-{k:05d}-{content_key(n_bins, [(s, inputs[s]) for s in chunk])[:16]}.parquet"
        for k, chunk in enumerate(chunks)
    ]
    linked = {n for n, chunk in zip(names, chunks, strict=True) if _linkable(prev, n, chunk, fresh)}
    rows = 0
    for name, chunk in zip(names, chunks, strict=True):
        rows += len(chunk)
        if name in linked:
            link_or_copy(prev.folder / name, folder / name)
            continue
        new = fresh.rows(chunk)
        old = prev.rows(s for s in chunk if s not in new)
        part = []
        for s in chunk:
            if s in new:
                cells, counts, n = new[s]
            else:
                _, _, cells, counts = old[s]
                n = int(np.frombuffer(counts, "<i8").sum())
            part.append((s, inputs[s], n_bins, n, cells, counts))
        write_table("label_issue_stats", _frame(part), folder / name)
    units = _frame([_unit(POOLED, pooled), _unit(TOTAL, total)])
    write_table("label_issue_stats", units, folder / POOLED_PART)
    prev_folder, prev_record = previous_record(prev.version_dir, "label_issue_stats")
    record = folder_record(folder, uri, "*.parquet", prev_folder, prev_record)
    return record | {"rows": rows + 2}


def _linkable(prev: PreviousStats, name: str, chunk: list[str], fresh: StagedHists) -> bool:
    return prev.folder is not None and not any(s in fresh for s in chunk) and (prev.folder / name).is_file()


def _unit(unit_id: str, stats: PixelStats) -> tuple:
    cells, counts = stats.encode()
    return (unit_id, content_key(cells, counts), stats.hist.shape[1], int(stats.hist.sum()), cells, counts)
