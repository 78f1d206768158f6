"""One tile's pixels → its row of the ``tiles`` table: nodata and cloud fractions, content hash, per-band
mean, std and percentiles of the valid pixels.

Statistics come from exact per-band histograms (pixels of at most 16 bits) or a partial sort (other
dtypes), bit-identical to ``np.percentile``'s linear rule; the cloud test of small integer pixels compares
their exact integer sum with the least sum that passes, to the bit what the float32 mean gives. Small
integer tiles, the common case, are summarised by two compiled kernels (``tasks.ingest.tile_kernels``,
numba) that run without the GIL,
so the threads of one Dask worker summarise tiles side by side. Scratch buffers are reused per thread so a
Dask worker does not fault fresh pages in for every tile. Called by ``tasks.ingest.tiles``
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
        self.px = 0

    def masks(self, n: int) -> tuple[np.ndarray, ...]:
        """(four bool n: one band's hits or the kept pixels, nodata, bright, drop; float32 n; int64 n)."""
        if n > _SCRATCH_MAX:
            return (*(np.empty(n, bool) for _ in range(4)), np.empty(n, np.float32), np.empty(n, np.int64))
        if n > self.px:
            self.px = n
            self.bools = np.empty((4, n), bool)
            self.f32 = np.empty(n, np.float32)
            self.i64 = np.empty(n, np.int64)
        b = self.bools
        return (b[0, :n], b[1, :n], b[2, :n], b[3, :n], self.f32[:n], self.i64[:n])


_SCRATCH_MAX = 1 << 22
_SCRATCH = _Scratch()


@lru_cache(maxsize=256)
def _order_indices(m: int) -> tuple[np.ndarray, np.ndarray]:
    """For ``m`` values: the order statistics np.percentile's 'linear' method interpolates between (the
    lower ones, then the upper ones) and the interpolation weights, as numpy computes them."""
    vi = (m - 1) * _Q
    prev = np.floor(vi)
    above = vi >= m - 1
    ks = np.concatenate([np.where(above, m - 1, prev), np.where(above, m - 1, prev + 1)]).astype(np.int64)
    return ks, vi - np.where(above, -1, prev)


def _hist_summary(flat: np.ndarray, keep: np.ndarray | None, n_keep: int, offset: int) -> tuple:
    """Mean, std and PERCENTILES of every band of ``flat[:, keep]`` (integer pixels, bands x n; ``keep``
    None: all of them).

    From one exact histogram per band (``tile_kernels.order_stats``) instead of a float64 copy and a
    partition. The mean is the same correctly rounded quotient as numpy's; the std is the correctly
    rounded population std (numpy's differs from it by summation round-off, ~1e-16 relative); the
    percentiles are np.percentile's default 'linear' method to the bit: same virtual indexes, same order
    statistics, same interpolation.
    """
    bands = flat.shape[0]
    m = n_keep
    ks, gamma = _order_indices(m)
    s1, s2 = np.empty(bands, np.int64), np.empty(bands, np.int64)
    orders = np.empty((bands, len(ks)), np.int64)
    _kernels().order_stats(flat, _ALL if keep is None else keep, keep is not None, offset, ks, s1, s2, orders)
    mean = [(s - offset * m) / m for s in s1.tolist()]  # Python int / int: correctly rounded
    std = [float(np.sqrt((m * q - s * s) / (m * m))) for s, q in zip(s1.tolist(), s2.tolist(), strict=True)]
    order = orders.astype(np.float64) - offset
    k = len(gamma)
    return mean, std, _lerp(order[:, :k].T, order[:, k:].T, gamma[:, None])


_ALL = np.ones(1, bool)


def _kernels():
    """``tasks.ingest.tile_kernels``, imported on first use: numba costs ~0.2 s and ~55 MB to import."""
    from tasks.ingest import tile_kernels

    return tile_kernels


def _any_band(flat: np.ndarray, test, hits: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``test(flat[b], out=...)`` or-ed over the bands into ``out`` (bool n); ``hits`` is scratch."""
    test(flat[0], out=out)
    for b in range(1, len(flat)):
        np.logical_or(out, test(flat[b], out=hits), out=out)
    return out


def _visible_mean(flat: np.ndarray, vis: list[int], out: np.ndarray) -> None:
    """``out`` = np.add.reduce(flat[vis], axis=0, dtype=np.float32) / np.float32(len(vis)), to the bit:
    float32 accumulation band by band, in band order as the reduce does."""
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


def _bright(flat, vis: list[int], dn: float, out: np.ndarray, mean32: np.ndarray) -> np.ndarray:
    """``out`` = ``_visible_mean`` > ``dn`` (pixels of more than 16 bits and floats)."""
    _visible_mean(flat, vis, mean32)
    return np.greater(mean32, dn, out=out)


def _small_int_masks(
    flat: np.ndarray, w: int, pad, nodata, vis_idx, cloud_dn: float, keep: np.ndarray, acc: np.ndarray
) -> tuple[int, int]:
    """``summarise_tile``'s masks of pixels with at most 16 bits, in one compiled call: ``keep`` (bool n)
    := valid, and (nodata, dropped) pixel counts. Clouds: the exact integer sum of the visible bands
    against the least sum whose float32 mean exceeds ``cloud_dn`` (``_bright_sum``), so the same pixels
    as ``_bright``."""
    info = np.iinfo(flat.dtype)
    value = None if nodata is None else _nodata_value(nodata, flat.dtype)
    vis = np.asarray(vis_idx, np.int64)
    k = len(vis)
    least = _bright_sum(k, float(cloud_dn), k * int(info.min), k * int(info.max)) if k else 0
    (top, bottom), (left, right) = pad
    edges = (int(top), int(bottom), int(left), int(right))
    n_nodata, n_drop = _kernels().small_int_keep(
        flat, w, edges, value is not None, 0 if value is None else int(value), vis, least, keep, acc
    )
    return int(n_nodata), int(n_drop)


def _nodata_value(nodata: float, dtype: np.dtype):
    """``nodata`` as a scalar of an integer ``dtype`` (None: no pixel can equal it); floats unchanged."""
    if dtype.kind not in "ui":
        return nodata
    info = np.iinfo(dtype)
    f = float(nodata)
    return dtype.type(int(f)) if f.is_integer() and info.min <= f <= info.max else None


def _masks(flat: np.ndarray, h: int, w: int, pad, nodata, vis_idx, cloud_dn: float, bufs) -> tuple:
    """(nodata, dropped) masks of pixels of other dtypes (bool n each, or None: no such pixel), numpy
    band by band: a reduce over the band axis is a slow strided loop."""
    hits, nod_buf, bright_buf, drop_buf, mean32, _ = bufs
    nod = None
    if nodata is not None and np.isnan(nodata):
        if flat.dtype.kind == "f":
            nod = _any_band(flat, np.isnan, hits, nod_buf)
    elif nodata is not None and (value := _nodata_value(nodata, flat.dtype)) is not None:
        nod = _any_band(flat, partial(np.equal, value), hits, nod_buf)
    (top, bottom), (left, right) = pad
    if top or bottom or left or right:  # the fill is not nodata when the scene declares no nodata value
        if nod is None:
            nod = nod_buf
            nod.fill(False)
        grid = nod.reshape(h, w)
        grid[:top] = grid[h - bottom :] = True
        grid[:, :left] = grid[:, w - right :] = True
    bright = _bright(flat, list(vis_idx), cloud_dn, bright_buf, mean32) if vis_idx else None
    if nod is not None and bright is not None:
        return nod, np.logical_or(nod, bright, out=drop_buf)  # nodata, or data and cloud
    return nod, nod if nod is not None else bright


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
    bufs = _SCRATCH.masks(n)
    offset = _HIST_OFFSET.get(arr.dtype.name)
    small = offset is not None and len(vis_idx) <= 256 and n < 2**31
    if small:  # keep: the valid pixels
        keep = bufs[0]
        n_nodata, n_drop = _small_int_masks(flat, w, pad, nodata, vis_idx, cloud_dn, keep, bufs[5])
    else:
        nod, drop = _masks(flat, h, w, pad, nodata, vis_idx, cloud_dn, bufs)
        n_nodata = int(np.count_nonzero(nod)) if nod is not None else 0
        n_drop = int(np.count_nonzero(drop)) if drop is not None else 0
    n_data, n_cloud, n_valid = n - n_nodata, n_drop - n_nodata, n - n_drop
    out = {
        "nodata_fraction": 1.0 - n_data / n,
        "cloud_fraction": n_cloud / n_data if n_data else 0.0,
        "valid_fraction": n_valid / n,
        "content_hash": tile_hash(flat, arr.shape),
    }
    if not n_valid:
        nan = [float("nan")] * bands
        out.update(mean=nan, std=nan, **{f"p{p:02d}": nan for p in PERCENTILES})
        return out
    if small:
        mean, std, q = _hist_summary(flat, None if n_valid == n else keep, n_valid, offset)
    else:
        px = (flat if drop is None else flat[:, ~drop]).astype(np.float64)
        q = np.percentile(px, PERCENTILES, axis=1)
        mean, std = px.mean(axis=1).tolist(), px.std(axis=1).tolist()
    out.update(mean=mean, std=std)
    out.update({f"p{p:02d}": q[i].tolist() for i, p in enumerate(PERCENTILES)})
    return out
