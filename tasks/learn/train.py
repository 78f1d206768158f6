"""K-fold training across sites, out-of-sample prediction, and the final model.

Folds are by site (never by pixel: neighbouring pixels of one site would leak), dealt round-robin within
each role after a seeded shuffle, so every fold gets gold, multi and single sites. Training samples random
crops with a random dihedral flip/rotation; a site is drawn in proportion to its usable weight, so
cloud-covered or uncertain sites count for what they carry.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from tasks.learn.model import (
    CLASSES,
    ModelConfig,
    UNet,
    load_checkpoint,
    pick_device,
    predict,
    seed_everything,
    set_threads,
    to_channels_last,
    train,
)
from tasks.learn.params import LearnParams
from tasks.memory import trim_heap

_INIT_LOCK = threading.Lock()


@dataclass
class Example:
    """One labelled site: normalised pixels (C, H, W), target classes (H, W), pixel weights (H, W)."""

    site_id: str
    role: str
    x: np.ndarray
    target: np.ndarray
    weight: np.ndarray

    @property
    def channels(self) -> int:
        return int(self.x.shape[0])

    @property
    def hw(self) -> tuple[int, int]:
        return self.target.shape

    @property
    def mass(self) -> float:
        """The site's usable weight: how often ``crop_batches`` draws it."""
        return float(self.weight.sum())

    def crop(self, r0: int, c0: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x, target, weight) of the window at (r0, c0), cut at the tile's edge."""
        sl = (slice(r0, r0 + size), slice(c0, c0 + size))
        return self.x[(slice(None), *sl)], self.target[sl], self.weight[sl]


def assign_folds(site_ids, roles, k: int, seed: int) -> dict[str, int]:
    """site_id -> fold 0..k-1, deterministic for (ids, roles, k, seed) and independent of row order."""
    order = sorted(zip(roles, site_ids, strict=True))
    rng = np.random.default_rng(seed)
    folds: dict[str, int] = {}
    offset = 0
    for role in sorted(set(roles)):
        ids = [s for r, s in order if r == role]
        for j, i in enumerate(rng.permutation(len(ids))):
            folds[ids[i]] = (j + offset) % k
        offset += len(ids)
    return folds


def crop_batches(examples: list, batch: int, crop: int, seed: int):
    """Endless (x, y, w) batches of random crops; tiles smaller than ``crop`` are padded with weight 0.

    ``examples`` are ``Example`` or anything with its ``channels``, ``hw``, ``mass`` and ``crop``
    (``tiles.DiskExample`` reads each crop from disk): the same seed draws the same crops from both.
    """
    rng = np.random.default_rng(seed)
    mass = np.array([e.mass for e in examples])
    p = mass / mass.sum()
    c = examples[0].channels
    while True:
        x = np.zeros((batch, c, crop, crop), np.float32)
        y = np.zeros((batch, crop, crop), np.int64)
        w = np.zeros((batch, crop, crop), np.float32)
        for b, i in enumerate(rng.choice(len(examples), size=batch, p=p)):
            e = examples[i]
            h, wd = e.hw
            r0 = int(rng.integers(0, max(h - crop, 0) + 1))
            c0 = int(rng.integers(0, max(wd - crop, 0) + 1))
            xs, ys, ws = e.crop(r0, c0, crop)
            k, flip = int(rng.integers(4)), bool(rng.integers(2))
            xs, ys, ws = (np.rot90(a, k, axes=(-2, -1)) for a in (xs, ys, ws))
            if flip:
                xs, ys, ws = (a[..., ::-1] for a in (xs, ys, ws))
            hh, ww = ys.shape
            x[b, :, :hh, :ww], y[b, :hh, :ww], w[b, :hh, :ww] = xs, ys, ws
        yield x, y, w


def class_coverage(examples: list[Example]) -> tuple[dict[str, float], list[str]]:
    """Weighted training pixels per class, and a note for every class the model never sees.

    A class without pixels still gets a softmax output (driven towards 0); the note tells the reader
    that its probabilities mean nothing, rather than failing a campaign that, say, has no fields yet.
    """
    return coverage_from([class_sums(e.target, e.weight) for e in examples])


def class_sums(target: np.ndarray, weight: np.ndarray) -> list:
    """One site's weighted pixels per class (float32 sums, as ``class_coverage`` adds them)."""
    return [((target == i) * weight).sum() for i in range(len(CLASSES))]


def coverage_from(per_site: list[list]) -> tuple[dict[str, float], list[str]]:
    """``class_coverage`` from each site's ``class_sums``, added in site order."""
    px = {c: float(sum(s[i] for s in per_site)) for i, c in enumerate(CLASSES)}
    notes = [
        f"class {c!r} never seen in training: its probabilities are not learnt"
        for c, v in px.items()
        if v == 0 and per_site
    ]
    return px, notes


def configure_threads(params: LearnParams) -> int:
    """Torch CPU threads: the configured number, else the Dask worker's thread count, else every core.

    Sized to the worker because its other slots may be busy (OpenMP threads fighting over cores ran a
    training step 3-10x slower on a loaded two-core machine), and set explicitly because Dask's nanny
    exports OMP_NUM_THREADS=1, which a process outside Dask does not have.
    """
    n = params.torch_threads
    if not n:
        try:
            from distributed import get_worker

            n = get_worker().state.nthreads
        except (ImportError, ValueError):
            n = len(os.sched_getaffinity(0))
    set_threads(n)
    reuse_large_allocations()
    return n


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def reuse_large_allocations() -> bool:
    """Let glibc reuse freed memory for allocations up to 32 MiB instead of mapping each afresh.

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``; setting it freezes glibc's mmap
    threshold at 128 KiB, so every activation and gradient buffer of a training step is a fresh mmap,
    zero-filled page by page, then unmapped. Training ran 1.5x slower under that variable (10.7-12.2 vs
    16.3-18.2 steps/s, base 8, one thread, this machine). A 32 MiB threshold (glibc's own dynamic
    ceiling) gives the speed back; trimming stays as the nanny set it. Only where the variable is set
    (glibc's default is adaptive already); a no-op without glibc. Returns whether it was applied.
    """
    if not os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 32 * 2**20))
    except (OSError, AttributeError):
        return False


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS once a network is done (glibc ``malloc_trim``): with the
    raised mmap threshold its buffers would otherwise stay in the worker's heap for the next stages.
    Only where ``reuse_large_allocations`` applies."""
    if os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        trim_heap()


def fit(examples: list, params: LearnParams, seed: int, device) -> tuple[UNet, dict]:
    """Train one network from scratch on ``examples``; return it and a training record.

    The initial weights come from torch's global generator, which a Dask worker with several threads
    shares between concurrent fits: seeding and building under a lock makes each network's weights depend
    on its own seed alone (training draws nothing more from it: the crops have their own generator).
    """
    with _INIT_LOCK:
        seed_everything(seed)
        model = UNet(ModelConfig(base_width=params.base_width, depth=params.depth)).to(device)
    if params.channels_last and device.type == "cuda":
        model = to_channels_last(model)
    t0 = time.perf_counter()
    losses = train(
        model,
        crop_batches(examples, params.batch_size, params.crop_px, seed),
        params.steps,
        lr=params.lr,
        weight_decay=params.weight_decay,
        class_weights=params.class_weights,
        device=device,
        bf16=params.bf16,
        channels_last=params.channels_last,
    )
    tail = losses[-max(1, len(losses) // 10) :]
    record = {
        "steps": len(losses),
        "seconds": time.perf_counter() - t0,
        "first_loss": losses[0] if losses else float("nan"),
        "final_loss": float(np.mean(tail)) if losses else float("nan"),
        "sites": len(examples),
    }
    return model, record


def predict_sites(model: UNet, xs: list[np.ndarray], valids: list[np.ndarray], params: LearnParams, device):
    """Probabilities (3, H, W) per tile, NaN where the input is nodata or cloud; equal-size tiles batch.

    Every batch is padded with zero tiles to ``infer_batch_size``: kernels may pick another algorithm
    (and round differently) for another batch size, and a tile's probabilities must not depend on which
    tiles it was predicted with, so that a reused raster equals a recomputed one bit for bit.
    """
    out: list[np.ndarray | None] = [None] * len(xs)
    by_shape: dict[tuple, list[int]] = {}
    for i, x in enumerate(xs):
        by_shape.setdefault(x.shape, []).append(i)
    for idx in by_shape.values():
        tiles = np.stack([xs[i] for i in idx])
        pad = (-len(idx)) % params.infer_batch_size
        if pad:
            tiles = np.concatenate([tiles, np.zeros((pad, *tiles.shape[1:]), tiles.dtype)])
        prob = predict(
            model,
            tiles,
            batch_size=params.infer_batch_size,
            device=device,
            bf16=params.bf16,
            channels_last=params.channels_last,
        )
        for j, i in enumerate(idx):
            p = prob[j]
            p[:, ~valids[i]] = np.nan
            out[i] = p
    return out


def pixel_sums(prob: np.ndarray, target: np.ndarray, weight: np.ndarray) -> list[tuple[float, float]]:
    """One site's weighted (intersection, union) per class and of field, for ``metrics_from``."""
    w = weight * np.isfinite(prob).all(axis=0)
    pred = np.nan_to_num(prob).argmax(axis=0)
    pairs = [(pred == c, target == c) for c in range(len(CLASSES))] + [(pred > 0, target > 0)]
    return [(float((w * (a & b)).sum()), float((w * (a | b)).sum())) for a, b in pairs]


def pixel_metrics(probs: list[np.ndarray], examples: list[Example]) -> dict:
    """Weight-averaged IoU per class and of field (interior + boundary) of argmax predictions vs targets."""
    return metrics_from(
        [pixel_sums(p, e.target, e.weight) for p, e in zip(probs, examples, strict=True) if p is not None]
    )


def metrics_from(per_site: list[list[tuple[float, float]]]) -> dict:
    """``pixel_metrics`` from each site's ``pixel_sums``, added in site order."""
    inter = np.zeros(len(CLASSES) + 1)
    union = np.zeros(len(CLASSES) + 1)
    for sums in per_site:
        for c, (i, u) in enumerate(sums):
            inter[c] += i
            union[c] += u
    names = [*CLASSES, "field"]
    return {f"iou_{n}": float(inter[i] / union[i]) if union[i] else float("nan") for i, n in enumerate(names)}


def device_for(params: LearnParams) -> tuple:
    device = pick_device(params.device)
    return device, params.for_device(device.type == "cuda")


def load_for_inference(path, device, params: LearnParams) -> tuple[UNet, dict]:
    """A checkpoint as ``fit`` left the network (device, memory format), so that its predictions equal
    those made right after training."""
    model, card = load_checkpoint(path, device)
    if params.channels_last and device.type == "cuda":
        model = to_channels_last(model)
    return model, card
