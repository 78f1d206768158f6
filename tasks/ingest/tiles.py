"""Site tiles → the ``tiles`` table: per-band statistics, nodata and cloud fractions, content keys.

Each Dask task summarises the site windows of one scene (or of a run of its tiles) as ``tasks.ingest.pixels``
sweeps the scene's block strips. Statistics come from exact per-band histograms (integer pixels) or a
partial sort (floats), bit-identical to ``np.percentile``'s linear rule, with scratch buffers reused per
thread so a Dask worker does not fault fresh pages in for every tile.
"""

from __future__ import annotations

import threading
import uuid
from functools import partial

import dask
import dask.local
import numpy as np
import pandas as pd
from dask.system import CPU_COUNT

from tasks.ingest.imagery import Scene
from tasks.ingest.pixels import SceneTiles, is_read_error, sweep
from tasks.store.artifacts import bytes_hash
from tasks.store.errors import InputError
from tasks.store.reuse import code_key, content_key

PERCENTILES = (2, 50, 98)


VISIBLE = {"b", "g", "r", "blue", "green", "red", "b02", "b03", "b04"}


def visible_bands(names) -> list[int]:
    """Indices of the visible bands, by name; scenes without named B/G/R bands get no cloud screening."""
    return [i for i, n in enumerate(names) if str(n).lower() in VISIBLE]


# np.percentile divides the percentiles by 100 before its 'linear' recipe; _hist_summary repeats the recipe.
_Q = np.true_divide(np.asarray(PERCENTILES), 100)
# Integer dtypes summarised from exact per-band histograms, with the offset that makes their values >= 0.
_HIST_OFFSET = {"uint8": 0, "uint16": 0, "int8": 128, "int16": 32768}


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
    flat: np.ndarray, drop: np.ndarray | None, n_keep: int, offset: int, idx: np.ndarray
) -> tuple:
    """Mean, std and PERCENTILES of every band of ``flat[:, ~drop]`` (integer pixels, bands x n).

    From one exact histogram per band instead of a float64 copy and a partition. The mean is the same
    correctly rounded quotient as numpy's; the std is the correctly rounded population std (numpy's
    differs from it by summation round-off, ~1e-16 relative); the percentiles are np.percentile's default
    'linear' method to the bit: same virtual indexes, same order statistics, same interpolation.
    ``idx`` is an intp buffer of n: each band is cast into it, so ``np.bincount`` makes no copy of its own.
    """
    bands, n = flat.shape
    m = n_keep
    n_drop = n - m
    vi = (m - 1) * _Q
    prev = np.floor(vi)
    above = vi >= m - 1
    ks = np.concatenate([np.where(above, m - 1, prev), np.where(above, m - 1, prev + 1)]).astype(np.int64)
    gamma = vi - np.where(above, -1, prev)
    # Few pixels dropped: histogram all of them, subtract the dropped ones; most dropped: the kept ones.
    few = 2 * n_drop <= n
    part = np.compress(drop, flat, axis=1) if n_drop and few else None
    if not few:
        flat = np.compress(~drop, flat, axis=1)
    s1, s2, orders = [], [], []
    for b in range(bands):
        if few:
            np.copyto(idx, flat[b], casting="unsafe")  # exact: every value of these dtypes fits intp
            if offset:
                idx += offset
            hist = np.bincount(idx)
            if part is not None:
                dropped = np.bincount(part[b].astype(np.intp) + offset)
                hist[: len(dropped)] -= dropped
        else:
            hist = np.bincount(flat[b].astype(np.intp) + offset)
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


def _visible_mean(flat: np.ndarray, vis: list[int], out: np.ndarray, scratch: np.ndarray) -> None:
    """``out`` = np.add.reduce(flat[vis], axis=0, dtype=np.float32) / np.float32(len(vis)), to the bit.

    Small integer pixels are summed as int32 (exact, vectorised) and converted once; other dtypes
    accumulate in float32 band by band, in band order as the reduce does.
    """
    if flat.dtype.name in _EXACT_SUM and len(vis) <= 256:
        acc = scratch.view(np.int32)[: len(out)]
        np.copyto(acc, flat[vis[0]])
        for b in vis[1:]:
            np.add(acc, flat[b], out=acc)
        np.copyto(out, acc)
    else:
        np.copyto(out, flat[vis[0]], casting="unsafe")
        for b in vis[1:]:
            np.add(out, flat[b], out=out, dtype=np.float32, casting="unsafe")
    np.divide(out, np.float32(len(vis)), out=out)


def _nodata_value(nodata: float, dtype: np.dtype):
    """``nodata`` as a scalar of an integer ``dtype`` (None: no pixel can equal it); floats unchanged."""
    if dtype.kind not in "ui":
        return nodata
    info = np.iinfo(dtype)
    f = float(nodata)
    return dtype.type(int(f)) if f.is_integer() and info.min <= f <= info.max else None


def _stats(
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
        _visible_mean(flat, list(vis_idx), mean32, idx)
        bright = np.greater(mean32, cloud_dn, out=bright_buf)
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
        "content_hash": bytes_hash(flat.reshape(-1).view(np.uint8), str(arr.shape).encode()),
    }
    if n_valid:
        offset = _HIST_OFFSET.get(arr.dtype.name)
        if offset is not None and n_valid < 2**31:
            mean, std, q = _hist_summary(flat, drop, n_valid, offset, idx)
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


def cloud_dn(dtype: str, threshold: float | None) -> float:
    """DN above which the visible-band mean counts as cloud: explicit, or a default per dtype."""
    if threshold is not None:
        return float(threshold)
    return 220.0 if dtype == "uint8" else 0.45 if dtype.startswith("float") else 4500.0


# The columns ``tile_stats`` computes from pixels (in its order); the rest of a row comes from ``pairs``.
STAT_COLUMNS = (
    "nodata_fraction",
    "cloud_fraction",
    "valid_fraction",
    "content_hash",
    "mean",
    "std",
    *(f"p{p:02d}" for p in PERCENTILES),
)
TILE_COLUMNS = ("site_id", "scene_id", "crs", "transform", "width", "height", "band_names", *STAT_COLUMNS)


def tile_unit(site_id: str, scene_id: str) -> str:
    """The reuse unit id of a tile."""
    return f"{site_id}/{scene_id}"


def tile_keys(pairs: pd.DataFrame, scenes: dict[str, Scene], cloud_threshold: float | None) -> dict[str, str]:
    """Per tile (``tile_unit``): the content key of exactly what its ``tile_stats`` row depends on.

    The pixels are the scene file's bytes (its hash: data, nodata value, dtype and size, which decide the
    padding) inside the window; the band names decide which bands screen clouds, and the threshold (or
    the dtype default) how bright a cloud is; the code is the ingest and store packages.
    """
    code = code_key("tasks.ingest", "tasks.store")
    keys = {}
    for p in pairs.itertuples(index=False):
        sc = scenes[p.scene_id]
        window = [int(p.col_off), int(p.row_off), int(p.width), int(p.height)]
        keys[tile_unit(p.site_id, p.scene_id)] = content_key(
            "ingest/tile",
            sc.file_hash,
            p.crs,
            [float(v) for v in p.transform],
            window,
            cloud_threshold,
            list(sc.band_names),
            code,
        )
    return keys


# Tiles per Dask task at most: a scene with more is swept by several tasks, one per run of its tiles in
# row order (they decode the block rows between their runs twice, but spread over the workers).
SECTION_TILES = 128


def scene_tasks(pairs: pd.DataFrame, scenes: dict[str, Scene]) -> list[tuple[SceneTiles, list[int]]]:
    """The Dask tasks of ``tile_stats``: per scene, its tiles in row order, in runs of at most
    ``SECTION_TILES``; each with the positions in ``pairs`` of its windows."""
    out = []
    for scene_id, rows in pairs.groupby("scene_id", sort=False).indices.items():
        sc = scenes[scene_id]
        part = pairs.iloc[rows]
        ro, co = part["row_off"].to_numpy(), part["col_off"].to_numpy()
        order = np.lexsort((co, ro))  # by row, then column: neighbours share strips
        n_sections = -(-len(order) // SECTION_TILES)
        for sec in np.array_split(order, n_sections):
            sub = part.iloc[sec]
            job = SceneTiles(
                path=sc.path,
                height=sc.height,
                width=sc.width,
                count=sc.count,
                dtype=sc.dtype,
                block_h=sc.block_shape[0],
                block_w=sc.block_shape[1],
                fill=sc.nodata if sc.nodata is not None else 0,
                windows=tuple(
                    (int(r), int(c), int(h), int(w))
                    for r, c, h, w in zip(sub.row_off, sub.col_off, sub.height, sub.width, strict=True)
                ),
                names=tuple(f"site {sid!r}" for sid in sub.site_id),
            )
            out.append((job, [int(rows[i]) for i in sec]))
    return out


def _summarise(tile: np.ndarray, pad: tuple, nodata, vis_idx, dn) -> dict:
    return _stats(tile, nodata, vis_idx, dn, pad)


def _scene_stats(job: SceneTiles, nodata, vis_idx: list[int], dn: float, threads: int) -> list[dict]:
    """One Dask task: the statistics of ``job``'s tiles, whose pixels it reads (``tasks.ingest.pixels``),
    with ``threads`` helper threads summarising while the task's thread reads."""
    return sweep(job, partial(_summarise, nodata=nodata, vis_idx=vis_idx, dn=dn), threads)


def scheduler_threads() -> int:
    """Threads the active Dask scheduler runs tasks on: a Client's workers' threads, the local pool's
    size, 1 for the synchronous scheduler."""
    sched = dask.base.get_scheduler()
    client = sched if hasattr(sched, "nthreads") else getattr(sched, "__self__", None)
    if client is not None and hasattr(client, "nthreads"):
        try:
            return max(1, sum(client.nthreads().values()))
        except Exception:  # pragma: no cover - a client that cannot answer: assume the local cores
            return CPU_COUNT
    if sched is dask.local.get_sync:
        return 1
    return int(dask.config.get("num_workers", None) or CPU_COUNT)


def helper_threads(n_tasks: int, threads: int) -> int:
    """Helper threads per scene task: one while the tasks are fewer than the scheduler's threads (else a
    core would idle), none otherwise. More threads than cores cost more than they give: ``np.bincount``
    holds the GIL, so summarising threads of one process queue for it (measured on the demo region with
    local threads, 2 cores: 0.15 s with none vs 0.17 s with one per task)."""
    return 1 if n_tasks < threads else 0


def tile_stats(
    pairs: pd.DataFrame, scenes: dict[str, Scene], cloud_threshold: float | None, threads: int | None = None
) -> pd.DataFrame:
    """Statistics of every (site, scene) tile in ``pairs``; runs on the active Dask scheduler.

    One task per scene (or per run of ``SECTION_TILES`` of its tiles, see :func:`scene_tasks`) reads the
    scene with rasterio windowed reads of block-aligned strips inside the task and returns only the
    statistics: no pixel array goes through the graph, each block under the tiles is decoded once per
    task, and a task holds about a tile's height plus one strip of the scene, never the scene.
    ``threads``: helper threads per task (default :func:`helper_threads` for the active scheduler).
    """
    jobs = scene_tasks(pairs, scenes)
    if threads is None:
        threads = helper_threads(len(jobs), scheduler_threads())
    tasks, where = [], []
    for job, positions in jobs:
        sc = scenes[pairs.scene_id.iloc[positions[0]]]
        token = uuid.uuid4().hex
        # A literal (not traversed, not tokenized): the job holds only windows, nothing for Dask to find.
        windows = dask.delayed(job, name=f"ingest-windows-{sc.scene_id}-{token}", traverse=False)
        tasks.append(
            dask.delayed(_scene_stats, pure=False)(
                windows,
                sc.nodata,
                visible_bands(sc.band_names),
                cloud_dn(sc.dtype, cloud_threshold),
                threads,
                dask_key_name=f"ingest-tiles-{sc.scene_id}-{token}",
            )
        )
        where.append(positions)
    try:
        done = dask.compute(*tasks)
    except InputError:
        raise
    except Exception as exc:
        # Reads fail inside the tasks as InputErrors naming file and window; a read error that surfaces
        # another way (on a worker, as another type) names the scenes of this batch.
        if not is_read_error(exc):
            raise
        paths = sorted({job.path for job, _ in jobs})
        raise InputError(", ".join(paths), f"corrupt or truncated imagery: {exc}") from None
    stats: list = [None] * len(pairs)
    for positions, results in zip(where, done, strict=True):
        for i, st in zip(positions, results, strict=True):
            stats[i] = st
    out = pairs[["site_id", "scene_id", "crs", "transform", "width", "height"]].reset_index(drop=True).copy()
    out["band_names"] = [list(scenes[s].band_names) for s in out.scene_id]
    stats_df = pd.DataFrame(stats)
    return pd.concat([out, stats_df], axis=1)
