"""Site tiles → the ``tiles`` table: per-band statistics, nodata and cloud fractions, content keys.

Each Dask task summarises the site windows of one scene (or of a run of its tiles) as ``tasks.ingest.pixels``
sweeps the scene's block strips; ``tasks.ingest.tile_summary`` computes each tile's statistics.
"""

from __future__ import annotations

import uuid
from functools import partial

import dask
import dask.local
import numpy as np
import pandas as pd
from dask.system import CPU_COUNT

from tasks.ingest.imagery import Scene
from tasks.ingest.pixels import SceneTiles, is_read_error, sweep
from tasks.ingest.tile_summary import PERCENTILES, summarise_tile
from tasks.store.errors import InputError
from tasks.store.reuse import code_key, content_key

VISIBLE = {"b", "g", "r", "blue", "green", "red", "b02", "b03", "b04"}


def visible_bands(names) -> list[int]:
    """Indices of the visible bands, by name; scenes without named B/G/R bands get no cloud screening."""
    return [i for i, n in enumerate(names) if str(n).lower() in VISIBLE]


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
    return summarise_tile(tile, nodata, vis_idx, dn, pad)


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
    core would idle), none otherwise. More threads than cores cost more than they give (measured on the
    demo region with local threads, 2 cores, 2 scene tasks: 88-91 ms with none vs 92-95 ms with one
    per task)."""
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
        # The job rides in the task itself (a partial, neither traversed nor tokenized): a separate
        # literal task would be computed on one worker and fetched by the other.
        vis, dn = visible_bands(sc.band_names), cloud_dn(sc.dtype, cloud_threshold)
        summarise = partial(_scene_stats, job, sc.nodata, vis, dn, threads)
        key = f"ingest-tiles-{sc.scene_id}-{uuid.uuid4().hex}"
        tasks.append(dask.delayed(summarise, pure=False)(dask_key_name=key))
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
