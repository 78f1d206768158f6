"""Site tiles cut out of block-aligned strips of a scene, read with rasterio inside one Dask task.

A task (:class:`SceneTiles`: a file name and pixel windows, a few kilobytes) opens the scene itself,
sweeps down it one strip at a time, a strip being whole rows of the file's blocks (at least
``STRIP_ROWS`` rows) over only the block columns its tiles need, and hands every tile to ``summarise`` as
soon as the strips under it are in. A strip is dropped once no tile still to come needs its rows, so a
task holds about one tile height plus one strip of the columns it needs, never a whole scene; every block
under the task's tiles is decoded exactly once, however many tiles overlap it.

Why plain rasterio windowed reads rather than a Dask-chunked xarray (rioxarray) for this path: with the
scene as a Dask array, every tile is a slice of up to four chunks, so either the chunks travel to the task
that summarises the tile (pickled between worker processes on a cluster) or every tile reads its own
window and decodes each block it shares with its neighbours again (sites are 224 px at arbitrary
offsets, COG blocks 256 px: up to four times), and each chunk task reopens the file. Reading inside the
task keeps the pixels in the process that decodes them: the Dask graph carries only windows and returns
only the per-tile statistics, and memory stays bounded by a strip, not the scene. No pixel array outlives
its task, so there is no lazy array for xarray to describe.

Within a task, the task's own thread reads strips and copies each finished tile out of them, and helper
threads (``sweep``'s ``threads``) may summarise the tiles meanwhile (GDAL decoding and the large numpy
copies release the GIL, and so do the compiled tile statistics of ``tasks.ingest.tile_summary``), so one
scene can keep two cores busy without splitting it into tasks that would decode their shared block rows
twice. The caller gives a task helpers only when there are fewer tasks than scheduler threads
(``tiles.helper_threads``): more threads than cores only take turns. Strip and tile arrays are reused
within a task.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import rasterio
from rasterio.errors import RasterioIOError
from rasterio.windows import Window

from tasks.memory import keep_freed_memory
from tasks.store.errors import InputError

# A read covers whole rows of blocks, at least this many rows (striped files have blocks of a few rows).
STRIP_ROWS = 256
# Blocks taller than this (a striped file written as one strip) are read STRIP_ROWS rows at a time.
_TALL_BLOCK = 1024
# Helper threads per task that summarise tiles while the task's thread reads.
TILE_THREADS = 1
# Tiles cut and waiting for (or being summarised by) the helper threads, at most: each holds a copy of
# its pixels, so this bounds the memory the reader may run ahead by.
_QUEUE = 16


@dataclass(frozen=True)
class SceneTiles:
    """One task's work: a scene file and the pixel windows of the tiles to cut from it.

    ``windows`` are (row_off, col_off, height, width) on the scene grid and may reach past its edges:
    the pixels outside are ``fill`` and ``summarise`` is told the padding.
    """

    path: str
    height: int
    width: int
    count: int
    dtype: str
    block_h: int
    block_w: int
    fill: float
    windows: tuple[tuple[int, int, int, int], ...]
    names: tuple[str, ...]  # what an error message calls each tile (e.g. its site id)


@dataclass(frozen=True)
class Plan:
    """How a task sweeps its scene: which strips and column spans it reads, when each tile is done."""

    strip_rows: int
    inside: tuple[tuple[int, int, int, int], ...]  # per tile: (r0, r1, c0, c1) clipped to the scene
    pads: tuple[tuple[tuple[int, int], tuple[int, int]], ...]  # per tile: ((top, bottom), (left, right))
    first: tuple[int, ...]  # per tile: its first strip (-1: no pixel inside the scene)
    last: tuple[int, ...]  # per tile: its last strip (-1: no pixel inside the scene)
    reads: dict[int, tuple[tuple[int, int], ...]]  # strip -> column spans (whole blocks), ascending strips
    ending: dict[int, tuple[int, ...]]  # strip -> tiles complete once it is read
    keep_from: dict[int, int]  # strip -> after it, the first strip a tile still to come needs

    def rows(self, strip: int, height: int) -> tuple[int, int]:
        return strip * self.strip_rows, min((strip + 1) * self.strip_rows, height)


def strip_rows(block_h: int) -> int:
    """Rows per read: whole blocks, at least ``STRIP_ROWS``; ``STRIP_ROWS`` for very tall blocks."""
    if block_h > _TALL_BLOCK:
        return STRIP_ROWS
    return max(block_h, -(-STRIP_ROWS // block_h) * block_h)


def plan(job: SceneTiles) -> Plan:
    """The reads and the order of a task's sweep (pure: no file is opened)."""
    H, W, bw = job.height, job.width, job.block_w
    S = strip_rows(job.block_h)
    inside, pads, first, last = [], [], [], []
    for ro, co, h, w in job.windows:
        r0, r1, c0, c1 = max(ro, 0), min(ro + h, H), max(co, 0), min(co + w, W)
        inside.append((r0, r1, c0, c1))
        pads.append(((r0 - ro, ro + h - r1), (c0 - co, co + w - c1)))
        empty = r1 <= r0 or c1 <= c0
        first.append(-1 if empty else r0 // S)
        last.append(-1 if empty else (r1 - 1) // S)
    spans: dict[int, list[tuple[int, int]]] = {}
    ending: dict[int, list[int]] = {}
    for k, (a, b) in enumerate(zip(first, last, strict=True)):
        if a < 0:
            continue
        c0, c1 = inside[k][2:]
        cover = ((c0 // bw) * bw, min(-(-c1 // bw) * bw, W))
        for s in range(a, b + 1):
            spans.setdefault(s, []).append(cover)
        ending.setdefault(b, []).append(k)
    reads = {}
    for s in sorted(spans):
        merged: list[list[int]] = []
        for a, b in sorted(spans[s]):
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        reads[s] = tuple((a, b) for a, b in merged)
    keep_from = {}
    for s in reads:
        later = [a for a, b in zip(first, last, strict=True) if b > s]
        keep_from[s] = min(later) if later else s + 1
    return Plan(
        strip_rows=S,
        inside=tuple(inside),
        pads=tuple(pads),
        first=tuple(first),
        last=tuple(last),
        reads=reads,
        ending={s: tuple(ks) for s, ks in ending.items()},
        keep_from=keep_from,
    )


def is_read_error(exc: BaseException) -> bool:
    """Whether ``exc`` looks like GDAL failing to read or decode a file's bytes."""
    return (
        isinstance(exc, RasterioIOError)
        or "rasterio" in type(exc).__module__
        or "TIFF" in str(exc)
        or "Read" in str(exc)
    )


def padded(tile: np.ndarray, pad: tuple, fill: float) -> np.ndarray:
    """``tile`` with ``pad`` rows/columns of ``fill`` around it (the parts of a window off the scene)."""
    if any(any(p) for p in pad):
        return np.pad(tile, ((0, 0), *pad), constant_values=fill)
    return tile


class _Buffers:
    """Flat arrays of one capacity, reused: a freed strip or tile comes back here instead of to the
    allocator (on a Dask worker every large freed block may go back to the OS, see ``keep_freed_memory``);
    there are never more of them than were in use at once."""

    def __init__(self, dtype, capacity: int) -> None:
        self.dtype, self.capacity = dtype, capacity
        self.free: list[np.ndarray] = []
        self.lock = threading.Lock()

    def take(self) -> np.ndarray:
        """A flat array of the capacity, to give back when it is no longer used."""
        with self.lock:
            if self.free:
                return self.free.pop()
        return np.empty(self.capacity, self.dtype)

    def give(self, base: np.ndarray) -> None:
        with self.lock:
            self.free.append(base)


def _cut(job: SceneTiles, pl: Plan, k: int, strips: dict, buffers: _Buffers) -> tuple[np.ndarray, np.ndarray]:
    """(tile ``k`` with its padding, the buffer to give back once it is summarised, if any)."""
    r0, r1, c0, c1 = pl.inside[k]
    base = buffers.take()
    tile = base[: job.count * (r1 - r0) * (c1 - c0)].reshape(job.count, r1 - r0, c1 - c0)
    for s in range(pl.first[k], pl.last[k] + 1):
        top = s * pl.strip_rows
        a, b = max(r0, top), min(r1, top + pl.strip_rows)
        for x0, x1, arr, _ in strips[s]:
            if x0 <= c0 and c1 <= x1:
                tile[:, a - r0 : b - r0] = arr[:, a - top : b - top, c0 - x0 : c1 - x0]
                break
        else:  # pragma: no cover - plan() puts every tile's columns into one span of each of its strips
            raise AssertionError(f"strip {s} does not hold the columns of tile {k}")
    full = padded(tile, pl.pads[k], job.fill)
    if full is not tile:  # a padded copy: the buffer is free again
        buffers.give(base)
        return full, None
    return tile, base


def _summarise(
    summarise: Callable, tile: np.ndarray, pad: tuple, base: np.ndarray | None, buffers: _Buffers
) -> dict:
    try:
        return summarise(tile, pad)
    finally:
        if base is not None:
            buffers.give(base)


def _outside(job: SceneTiles, pl: Plan, k: int, summarise: Callable) -> dict:
    """A window with no pixel inside the scene: all padding."""
    r0, r1, c0, c1 = pl.inside[k]
    empty = np.empty((job.count, max(r1 - r0, 0), max(c1 - c0, 0)), job.dtype)
    return summarise(padded(empty, pl.pads[k], job.fill), pl.pads[k])


def _gdal_message(exc: BaseException) -> str:
    """The error and, when rasterio only says "see previous exception", GDAL's own message."""
    cause = exc.__cause__ or exc.__context__
    return f"{exc} ({cause})" if cause is not None and str(cause) not in str(exc) else str(exc)


def _read(src, job: SceneTiles, pl: Plan, s: int, rows: tuple, cols: tuple, out: np.ndarray) -> np.ndarray:
    try:
        return src.read(window=Window(cols[0], rows[0], cols[1] - cols[0], rows[1] - rows[0]), out=out)
    except Exception as exc:
        if not is_read_error(exc):
            raise
        failure = _gdal_message(exc)
    # Raised outside the handler: with GDAL's error as its context the InputError would not unpickle
    # on the client (the worker then sends a bare Exception instead).
    k = next(k for k, (a, b) in enumerate(zip(pl.first, pl.last, strict=True)) if a <= s <= b)
    raise InputError(
        job.path,
        f"corrupt or truncated imagery: pixel window rows {rows[0]}:{rows[1]}, cols {cols[0]}:{cols[1]} "
        f"(under the tile of {job.names[k]}) cannot be read: {failure}",
    )


def _open(path: str):
    try:
        return rasterio.open(path)
    except Exception as exc:
        if not is_read_error(exc):
            raise
        failure = _gdal_message(exc)
    raise InputError(path, f"corrupt or truncated imagery: cannot open the file again: {failure}")


def sweep(
    job: SceneTiles, summarise: Callable[[np.ndarray, tuple], dict], threads: int | None = None
) -> list[dict]:
    """``summarise(tile, pad)`` of every window of ``job``, in its order; ``tile`` is (bands, y, x),
    C-contiguous, exactly the window's pixels with ``fill`` where it lies off the scene.

    Reads the strips of :func:`plan` in order, each once; ``threads`` helper threads (default
    ``TILE_THREADS``; 0: none) summarise finished tiles meanwhile. A file GDAL cannot read raises
    :class:`InputError` naming the file and the pixel window.
    """
    with keep_freed_memory():
        return _sweep(job, summarise, TILE_THREADS if threads is None else threads)


def _sweep(job: SceneTiles, summarise: Callable[[np.ndarray, tuple], dict], threads: int) -> list[dict]:
    pl = plan(job)
    out: list = [None] * len(job.windows)
    for k, s in enumerate(pl.first):
        if s < 0:
            out[k] = _outside(job, pl, k, summarise)
    if not pl.reads:
        return out
    src = _open(job.path)
    # A strip's column spans share one buffer; a tile's copy gets its own (summarised on a helper thread).
    widest = max(sum(b - a for a, b in spans) for spans in pl.reads.values())
    largest = max(
        (r1 - r0) * (c1 - c0) for (r0, r1, c0, c1), f in zip(pl.inside, pl.first, strict=True) if f >= 0
    )
    strip_buffers = _Buffers(job.dtype, job.count * pl.strip_rows * widest)
    tile_buffers = _Buffers(job.dtype, job.count * largest)
    queue: deque[tuple[int, Future]] = deque()
    with src, ThreadPoolExecutor(threads) if threads > 0 else nullcontext() as pool:
        strips: dict[int, list[tuple[int, int, np.ndarray, np.ndarray]]] = {}
        try:
            for s, spans in pl.reads.items():
                rows = pl.rows(s, job.height)
                base, used, strips[s] = strip_buffers.take(), 0, []
                for a, b in spans:
                    shape = (job.count, rows[1] - rows[0], b - a)
                    buf = base[used : used + shape[0] * shape[1] * shape[2]].reshape(shape)
                    used += buf.size
                    strips[s].append((a, b, _read(src, job, pl, s, rows, (a, b), buf), base))
                for k in pl.ending.get(s, ()):
                    while len(queue) >= _QUEUE:
                        done, fut = queue.popleft()
                        out[done] = fut.result()
                    tile, held = _cut(job, pl, k, strips, tile_buffers)
                    args = (summarise, tile, pl.pads[k], held, tile_buffers)
                    if pool is None:
                        out[k] = _summarise(*args)
                    else:
                        queue.append((k, pool.submit(_summarise, *args)))
                for t in [t for t in strips if t < pl.keep_from[s]]:
                    strip_buffers.give(strips.pop(t)[0][3])
            while queue:
                k, fut = queue.popleft()
                out[k] = fut.result()
        finally:
            for _, fut in queue:
                fut.cancel()
    return out
