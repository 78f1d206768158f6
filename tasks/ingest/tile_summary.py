"""One tile's pixels → its row of the ``tiles`` table: nodata and cloud fractions, content hash, per-band
mean, std and percentiles of the valid pixels.

Statistics come from exact per-band histograms (integer pixels) or a partial sort (floats), bit-identical
to ``np.percentile``'s linear rule; the cloud test of small integer pixels compares their exact int32
sum with the least sum that passes, to the bit what the float32 mean gives. Scratch buffers are reused per
thread so a Dask worker does not fault fresh pages in for every tile. Called by ``tasks.ingest.tiles``
for every tile a sweep (``tasks.ingest.pixels``) cuts.
"""

from __future__ import annotations

import threading
from functools import lru_cache, partial

import numpy as np
import xxhash

PERCENTILES = (2, 50, 98)


# np.percentile divides the percentiles by 100 before its 'linear' recipe; _hist_summary repeats the recipe.
_Q = np.true_divide(np.asarray(PERCENTILES), 100)
# Integer dtypes summarised from exact per-band histograms, with the offset that makes their values >= 0.
_HIST_OFFSET = {"uint8": 0, "uint16": 0, "int8": 128, "int16": 32768}


def tile_hash(flat: np.ndarray, shape: tuple) -> str:
    """XXH3-128 of a tile's pixel bytes (C order, ``flat`` contiguous) and its shape: the tile's content
    identity. Not BLAKE2b (used for files): at ~40 GB/s instead of ~1 GB/s, hashing every tile costs
    ~1 % of decoding it instead of ~45 %; tiles are not adversarial input, 128 bits keep collisions out."""
    h = xxhash.xxh3_128(flat.reshape(-1).view(np.uint8))
    h.update(str(shape).encode())
    return h.hexdigest()


def _lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """numpy's quantile interpolation (``numpy.lib._function_base_impl._lerp``), operation for operation."""
    diff = b - a
    return np.where(t >= 0.5, b - diff * (1 - t), a + diff * t)


class _Scratch(threading.local):
    """Per-thread buffers of the tile statistics, reused from tile to tile.

    A Dask worker process runs with ``MALLOC_TRIM_THRESHOLD_`` set (``distributed.nanny.pre-spawn-environ``),
    so glibc hands every large freed block back to the OS and each fresh array costs a page fault per
    4 KiB: with a tile's temporaries allocated anew, the tiles of the demo region took 0.15 s of kernel
    time there on top of 0.3 s of work. Tiles larger than ``_SCRATCH_MAX`` pixels get fresh arrays.
    """

    def __init__(self) -> None:
        self.px = self.ramp_len = 0
        self.kept_buf = np.empty(0, np.uint8)

    def masks(self, n: int) -> tuple[np.ndarray, ...]:
        """(one band's hits, nodata, bright, drop: bool n, mean: float32 n, index: intp n)."""
        if n > _SCRATCH_MAX:
            return (*(np.empty(n, bool) for _ in range(4)), np.empty(n, np.float32), np.empty(n, np.intp))
        if n > self.px:
            self.px = n
            self.bools = np.empty((4, n), bool)
            self.f32 = np.empty(n, np.float32)
            self.idx = np.empty(n, np.intp)
        b = self.bools
        return (b[0, :n], b[1, :n], b[2, :n], b[3, :n], self.f32[:n], self.idx[:n])

    def kept(self, dtype: np.dtype, bands: int, n: int) -> np.ndarray:
        """An array (bands, n) of ``dtype``."""
        if bands * n > _SCRATCH_MAX:
            return np.empty((bands, n), dtype)
        size = bands * n * dtype.itemsize
        if size > len(self.kept_buf):
            self.kept_buf = np.empty(size, np.uint8)
        return self.kept_buf[:size].view(dtype).reshape(bands, n)

    def ramp(self, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(0..size-1, their squares: int64; an int64 buffer of ``size``)."""
        if size > self.ramp_len:
            self.ramp_len = max(size, 2 * self.ramp_len)
            self.v = np.arange(self.ramp_len, dtype=np.int64)
            self.v2 = self.v * self.v
            self.cum = np.empty(self.ramp_len, np.int64)
        return self.v[:size], self.v2[:size], self.cum[:size]


_SCRATCH_MAX = 1 << 22
_SCRATCH = _Scratch()


def _hist_summary(
    flat: np.ndarray, keep: np.ndarray | None, n_keep: int, offset: int, idx: np.ndarray
) -> tuple:
    """Mean, std and PERCENTILES of every band of ``flat[:, keep]`` (integer pixels, bands x n; ``keep``
    None: all of them).

    From one exact histogram per band instead of a float64 copy and a partition. The mean is the same
    correctly rounded quotient as numpy's; the std is the correctly rounded population std (numpy's
    differs from it by summation round-off, ~1e-16 relative); the percentiles are np.percentile's default
    'linear' method to the bit: same virtual indexes, same order statistics, same interpolation.
    ``idx`` is an intp buffer of n: each band is cast into it, so ``np.bincount`` makes no copy of its own.
    The kept pixels are compressed out first (not all pixels counted and the dropped ones subtracted):
    dropped pixels are mostly one value (nodata), and counting a run of one value is a chain of increments
    of one counter, several times slower per pixel than counting varied values.
    """
    bands = flat.shape[0]
    m = n_keep
    vi = (m - 1) * _Q
    prev = np.floor(vi)
    above = vi >= m - 1
    ks = np.concatenate([np.where(above, m - 1, prev), np.where(above, m - 1, prev + 1)]).astype(np.int64)
    gamma = vi - np.where(above, -1, prev)
    if keep is not None:
        flat = np.compress(keep, flat, axis=1, out=_SCRATCH.kept(flat.dtype, bands, m))
    cast = idx[:m]
    s1, s2, orders = [], [], []
    for b in range(bands):
        np.copyto(cast, flat[b], casting="unsafe")  # exact: every value of these dtypes fits intp
        if offset:
            cast += offset
        hist = np.bincount(cast)
        v, v2, cum = _SCRATCH.ramp(len(hist))
        s1.append(int(hist @ v))  # exact: n_keep < 2**31 (caller)
        s2.append(int(hist @ v2))
        orders.append(np.searchsorted(np.cumsum(hist, out=cum), ks, side="right"))
    mean = [(s - offset * m) / m for s in s1]  # Python int / int: correctly rounded
    std = [float(np.sqrt((m * q - s * s) / (m * m))) for s, q in zip(s1, s2, strict=True)]
    order = np.array(orders, np.float64) - offset
    k = len(gamma)
    return mean, std, _lerp(order[:, :k].T, order[:, k:].T, gamma[:, None])


def _any_band(flat: np.ndarray, test, hits: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``test(flat[b], out=...)`` or-ed over the bands into ``out`` (bool n); ``hits`` is scratch."""
    test(flat[0], out=out)
    for b in range(1, len(flat)):
        np.logical_or(out, test(flat[b], out=hits), out=out)
    return out


# Integer pixels of at most 16 bits: a sum of up to 256 of them is an integer below 2**24, which float32
# holds exactly, so summing them as int32 and converting gives float32 accumulation's result exactly.
_EXACT_SUM = {"uint8", "int8", "uint16", "int16"}


def _exact_sum(flat: np.ndarray, vis: list[int]) -> bool:
    return flat.dtype.name in _EXACT_SUM and len(vis) <= 256


def _int_sum(flat: np.ndarray, vis: list[int], scratch: np.ndarray) -> np.ndarray:
    """The int32 sum of the bands ``vis`` (exact for ``_exact_sum`` pixels), in ``scratch``'s memory."""
    acc = scratch.view(np.int32)[: flat.shape[1]]
    np.copyto(acc, flat[vis[0]])
    for b in vis[1:]:
        np.add(acc, flat[b], out=acc)
    return acc


def _visible_mean(flat: np.ndarray, vis: list[int], out: np.ndarray, scratch: np.ndarray) -> None:
    """``out`` = np.add.reduce(flat[vis], axis=0, dtype=np.float32) / np.float32(len(vis)), to the bit.

    Small integer pixels are summed as int32 (exact, vectorised) and converted once; other dtypes
    accumulate in float32 band by band, in band order as the reduce does.
    """
    if _exact_sum(flat, vis):
        np.copyto(out, _int_sum(flat, vis, scratch))
    else:
        np.copyto(out, flat[vis[0]], casting="unsafe")
        for b in vis[1:]:
            np.add(out, flat[b], out=out, dtype=np.float32, casting="unsafe")
    np.divide(out, np.float32(len(vis)), out=out)


@lru_cache(maxsize=64)
def _bright_sum(n_vis: int, dn: float, low: int, top: int) -> int:
    """The least integer S in [low, top] with float32(S) / float32(n_vis) > dn as ``_visible_mean`` and
    ``np.greater`` compute it (top + 1: none). S is an exact float32 (|S| < 2**24) and the quotient is
    correctly rounded, so the test is monotone in S and a binary search finds where it turns true."""

    def bright(s: int) -> bool:
        return bool(np.greater(np.divide(np.array([s], np.float32), np.float32(n_vis)), dn)[0])

    while low <= top:
        mid = (low + top) // 2
        if bright(mid):
            top = mid - 1
        else:
            low = mid + 1
    return low


def _bright(flat, vis: list[int], dn: float, out: np.ndarray, mean32: np.ndarray, scratch: np.ndarray):
    """``out`` = ``_visible_mean`` > ``dn``, to the bit. Small integer pixels: their exact int32 sum
    against the least sum that passes (``_bright_sum``), without the float32 conversion and division."""
    if _exact_sum(flat, vis):
        lo, hi = np.iinfo(flat.dtype).min, np.iinfo(flat.dtype).max
        least = _bright_sum(len(vis), float(dn), len(vis) * int(lo), len(vis) * int(hi))
        return np.greater_equal(_int_sum(flat, vis, scratch), least, out=out)
    _visible_mean(flat, vis, mean32, scratch)
    return np.greater(mean32, dn, out=out)


def _nodata_value(nodata: float, dtype: np.dtype):
    """``nodata`` as a scalar of an integer ``dtype`` (None: no pixel can equal it); floats unchanged."""
    if dtype.kind not in "ui":
        return nodata
    info = np.iinfo(dtype)
    f = float(nodata)
    return dtype.type(int(f)) if f.is_integer() and info.min <= f <= info.max else None


def summarise_tile(
    arr: np.ndarray, nodata: float | None, vis_idx: list[int], cloud_dn: float, pad=((0, 0), (0, 0))
) -> dict:
    """Band statistics of one tile (bands, y, x); ``pad`` rows/columns lie outside the scene (no data).

    A pixel is nodata where any band equals ``nodata`` (or is NaN for a NaN nodata) or where it lies in
    the padding; cloud where it is data and the float32 mean of the visible bands exceeds ``cloud_dn``;
    valid otherwise. The per-band statistics are of the valid pixels.
    """
    arr = np.ascontiguousarray(arr)
    bands, h, w = arr.shape
    n = h * w
    flat = arr.reshape(bands, n)
    hits, nod_buf, bright_buf, drop_buf, mean32, idx = _SCRATCH.masks(n)
    nod = None
    # Band by band (a reduce over the band axis is a slow strided loop): == (arr == nodata).any(axis=0),
    # integer pixels compared as integers, not cast to float64.
    if nodata is not None and np.isnan(nodata):
        if flat.dtype.kind == "f":
            nod = _any_band(flat, np.isnan, hits, nod_buf)
    elif nodata is not None and (value := _nodata_value(nodata, flat.dtype)) is not None:
        if value == 0 and flat.dtype.kind == "u":  # some band is 0 where the bands' minimum is
            low = idx.view(flat.dtype)[:n]
            np.minimum(flat[0], flat[min(1, bands - 1)], out=low)
            for b in range(2, bands):
                np.minimum(low, flat[b], out=low)
            nod = np.equal(low, 0, out=nod_buf)
        else:
            nod = _any_band(flat, partial(np.equal, value), hits, nod_buf)
    (top, bottom), (left, right) = pad
    if top or bottom or left or right:  # the fill is not nodata when the scene declares no nodata value
        if nod is None:
            nod = nod_buf
            nod.fill(False)
        grid = nod.reshape(h, w)
        grid[:top] = grid[h - bottom :] = True
        grid[:, :left] = grid[:, w - right :] = True
    bright = None
    if vis_idx:  # == arr[vis_idx].astype(np.float32).mean(axis=0) > cloud_dn, without the copies
        bright = _bright(flat, list(vis_idx), cloud_dn, bright_buf, mean32, idx)
    if nod is not None and bright is not None:
        drop = np.logical_or(nod, bright, out=drop_buf)  # nodata, or data and cloud
    else:
        drop = nod if nod is not None else bright
    n_nodata = int(np.count_nonzero(nod)) if nod is not None else 0
    n_drop = int(np.count_nonzero(drop)) if drop is not None else 0
    n_data, n_cloud, n_valid = n - n_nodata, n_drop - n_nodata, n - n_drop
    out = {
        "nodata_fraction": 1.0 - n_data / n,
        "cloud_fraction": n_cloud / n_data if n_data else 0.0,
        "valid_fraction": n_valid / n,
        "content_hash": tile_hash(flat, arr.shape),
    }
    if n_valid:
        offset = _HIST_OFFSET.get(arr.dtype.name)
        if offset is not None and n_valid < 2**31:
            keep = None if n_valid == n else np.logical_not(drop, out=hits)
            mean, std, q = _hist_summary(flat, keep, n_valid, offset, idx)
        else:
            px = (flat if drop is None else flat[:, ~drop]).astype(np.float64)
            q = np.percentile(px, PERCENTILES, axis=1)
            mean, std = px.mean(axis=1).tolist(), px.std(axis=1).tolist()
        out.update(mean=mean, std=std)
        out.update({f"p{p:02d}": q[i].tolist() for i, p in enumerate(PERCENTILES)})
    else:
        nan = [float("nan")] * bands
        out.update(mean=nan, std=nan, **{f"p{p:02d}": nan for p in PERCENTILES})
    return out
