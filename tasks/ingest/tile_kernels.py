"""Compiled (numba, ``nogil``) kernels of ``tasks.ingest.tile_summary`` for tiles of pixels with at most 16
bits, the common case.

The numpy code they replace made ~30 calls of a few microseconds each per tile, and a numpy call that
short holds the GIL for most of its time (``np.bincount`` for all of it), so two threads summarising
tiles in one process ran barely faster than one. Each kernel is one call per tile that releases the GIL
for its whole loop. Compiled once per pixel dtype and cached beside this file (``cache=True``); imported
only when a tile is summarised, so processes that reuse every tile never load numba.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def small_int_keep(flat, w, pad, has_nodata, nodata, vis, least, keep, acc):  # pragma: no cover - compiled
    """``keep`` (bool n) := the valid pixels of ``flat`` (bands x n, rows of ``w``): no band equal to
    ``nodata`` (if ``has_nodata``), outside the ``pad`` (top, bottom, left, right), and the exact integer
    sum of the bands ``vis`` below ``least`` (``tile_summary._bright_sum``: not cloud). Returns
    (nodata, dropped) pixel counts. ``acc`` is int64 scratch of n."""
    bands, n = flat.shape
    keep[:] = True
    if has_nodata:
        for b in range(bands):
            row = flat[b]
            for i in range(n):
                keep[i] &= row[i] != nodata
    top, bottom, left, right = pad
    h = n // w if w else 0
    for r in range(h):
        if r < top or r >= h - bottom:
            keep[r * w : (r + 1) * w] = False
        else:
            keep[r * w : r * w + left] = False
            keep[(r + 1) * w - right : (r + 1) * w] = False
    n_nodata = n - np.count_nonzero(keep)
    if len(vis):
        acc[:] = 0
        for v in vis:
            row = flat[v]
            for i in range(n):
                acc[i] += row[i]
        for i in range(n):
            keep[i] &= acc[i] < least
    return n_nodata, n - np.count_nonzero(keep)


@numba.njit(nogil=True, cache=True)
def order_stats(flat, keep, use_keep, offset, ks, s1, s2, orders):  # pragma: no cover - compiled
    """Per band of ``flat`` (bands x n, integer pixels + ``offset`` >= 0) over the pixels ``keep`` holds
    (all of them unless ``use_keep``): the exact sum and sum of squares into ``s1``, ``s2`` and the order
    statistics ``ks`` (``np.searchsorted(np.cumsum(hist), ks, side="right")``) into ``orders``, from
    one exact histogram per band."""
    bands, n = flat.shape
    for b in range(bands):
        row = flat[b]
        top = row[0]
        for i in range(n):  # over all pixels (vectorised): a longer histogram than needed is still exact
            top = max(top, row[i])
        hist = np.zeros(np.int64(top) + offset + 1, np.int64)
        if use_keep:
            for i in range(n):
                hist[np.int64(row[i]) + offset] += keep[i]
        else:
            for i in range(n):
                hist[np.int64(row[i]) + offset] += 1
        total = np.int64(0)
        squares = np.int64(0)
        run = np.int64(0)
        for v in range(len(hist)):  # sums, then the histogram becomes its running total
            c = hist[v]
            total += c * v
            squares += c * v * v
            run += c
            hist[v] = run
        s1[b] = total
        s2[b] = squares
        orders[b] = np.searchsorted(hist, ks, side="right")
