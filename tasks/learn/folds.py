"""Training a new model: the K fold networks and the final one, each a Dask task of its own.

The train stage writes the labelled tiles to a scratch folder once (``tasks.learn.tiles``), then fans out
one task per network through ``tasks.parallel.cluster_scheduler``: the inner tasks ask for the stage's kind
of worker (GPU workers on a GPU cluster, else CPU workers), run side by side where there are several, and
queue on one. Each network's result depends on its own seed only (``params.seed + 1 + k`` for fold k,
``params.seed`` for the final model), never on where or in what order it ran, given the same device and
thread count. Outside Dask (plain calls, tests) they run one after another in this process, as before.

A fold task predicts its held-out sites a chunk at a time (reading them back from the scratch folder),
writes their out-of-sample rasters and its checkpoint, and returns its training record and per-site metric
sums; the final task returns its weights, which the stage saves with the model card (the card records every
fold's training).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import dask
import pandas as pd

from schemas.catalog import Catalog
from tasks.learn.inputs import (
    CARD,
    CHECKPOINT,
    CHUNK,
    MODEL_UNIT,
    REUSE_NOTE,
    Inputs,
    LearnStageResult,
    fold_checkpoint,
    folder_artifact,
    oos_key,
    version_id,
    write_prob_raster,
)
from tasks.learn.model import CLASSES, ModelConfig, UNet, n_parameters, save_checkpoint, torch_version
from tasks.learn.params import LearnParams
from tasks.learn.tiles import DiskExample, remove_tiles, scratch_folder, write_tiles
from tasks.learn.train import (
    configure_threads,
    coverage_from,
    fit,
    metrics_from,
    pixel_sums,
    predict_sites,
    release_free_memory,
)
from tasks.parallel import cluster_scheduler
from tasks.store.artifacts import unshare
from tasks.store.reuse import Reuse, reuse_counts, write_keys


@dataclass(frozen=True)
class FitJob:
    """One network to train: fold ``fold`` (trained without its sites, then predicting them) or, with
    ``fold`` None, the final model on every usable site."""

    name: str
    fold: int | None
    seed: int
    train: list[DiskExample]
    held: list[DiskExample]
    oos_dir: str
    checkpoint: str | None
    model_key: str


def _worker_address() -> str | None:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return None


def run_fit(job: FitJob, params: LearnParams, device_type: str) -> dict:
    """Train ``job``'s network with torch on this worker's thread count (``configure_threads``)."""
    import torch

    threads = configure_threads(params)
    try:
        return _run_fit(job, params, torch.device(device_type), threads)
    finally:
        release_free_memory()


def _run_fit(job: FitJob, params: LearnParams, device, threads: int) -> dict:
    model, rec = fit(job.train, params, job.seed, device)
    out = {"name": job.name, "fold": job.fold, "record": rec, "threads": threads, "worker": _worker_address()}
    if job.fold is None:
        out["config"] = asdict(model.config)
        out["state"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        return out
    sums = []
    for i in range(0, len(job.held), CHUNK):
        chunk = job.held[i : i + CHUNK]
        probs = predict_sites(
            model, [e.read("x") for e in chunk], [e.read("valid") for e in chunk], params, device
        )
        for e, p in zip(chunk, probs, strict=True):
            write_prob_raster(Path(job.oos_dir) / f"{e.site_id}.tif", e.grid, p)
            sums.append(pixel_sums(p, e.read("target"), e.read("weight")))
    save_checkpoint(
        unshare(job.checkpoint), model.cpu(), {"model_key": job.model_key, "fold": job.fold, "training": rec}
    )
    out["pixel_sums"] = sums
    return out


def fit_all(jobs: list[FitJob], params: LearnParams, device_type: str) -> list[dict]:
    """Run every job: as Dask tasks on the cluster when this runs on a Dask worker (the waiting stage task
    secedes, so it holds no thread), else here, one after another."""
    with cluster_scheduler() as client:
        if client is None:
            return [run_fit(j, params, device_type) for j in jobs]
        tasks = [dask.delayed(run_fit, pure=False)(j, params, device_type) for j in jobs]
        return list(dask.compute(*tasks, scheduler=client))


def train_models(
    catalog: Catalog,
    version_dir: Path,
    inp: Inputs,
    site_ids: list[str],
    folds: dict[str, int],
    key: str,
    params: LearnParams,
    device,
    env: dict,
    reuse: Reuse,
    notes: list[str],
) -> LearnStageResult:
    """Train every fold and the final model; write OOS rasters, checkpoints, the card and the keys
    (nothing of a new model's is reused). The tiles live on disk for the duration."""
    scratch = scratch_folder(version_dir)
    try:
        return _train_models(
            catalog, version_dir, inp, site_ids, folds, key, params, device, env, reuse, notes
        )
    finally:
        remove_tiles(scratch)


def _train_models(catalog, version_dir, inp, site_ids, folds, key, params, device, env, reuse, notes):
    ds = catalog.datasets
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    tiles = write_tiles(inp, site_ids, params, scratch_folder(version_dir))
    examples, usable = tiles.examples, tiles.usable
    if len(usable) < len(examples):
        skipped = sorted({e.site_id for e in examples} - {e.site_id for e in usable})
        notes.append(f"not trained on (nodata/cloud or no confident pixel): {', '.join(skipped)}")
    class_px, class_notes = coverage_from(tiles.class_sums)
    notes += class_notes
    timings["targets"] = time.perf_counter() - t0

    oos_dir = version_dir / ds["oos_probabilities"].uri
    model_dir = version_dir / ds["model"].uri
    base_counts = {
        "labelled_sites": len(examples),
        "trained_sites": len(usable),
        "model_reused": 0,
        "model_kept": 0,
    }
    if len(usable) < 2:
        notes.append(f"{len(usable)} trainable labelled site(s): no model trained, no probabilities written")
        return LearnStageResult(
            {"oos_probabilities": folder_artifact(oos_dir, ds["oos_probabilities"].uri)},  # no units, no keys
            timings,
            {**base_counts, "oos_sites": 0, "model_trained": 0, **reuse_counts("train", 0, 0)},
            notes,
        )

    t1 = time.perf_counter()
    jobs = []
    for k in range(params.folds):
        train_ex = [e for e in usable if folds[e.site_id] != k]
        held = [e for e in examples if folds[e.site_id] == k]
        if not train_ex or not held:
            notes.append(f"fold {k}: nothing to train on or to hold out; its sites get no probabilities")
            continue
        ckpt = str(model_dir / fold_checkpoint(k))
        jobs.append(FitJob(f"fold{k}", k, params.seed + 1 + k, train_ex, held, str(oos_dir), ckpt, key))
    jobs.append(FitJob("final", None, params.seed, usable, [], str(oos_dir), None, key))
    results = fit_all(jobs, params, device.type)
    timings["fit"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    records, metric_sums, keys, fold_ckpts, oos_sites = [], [], {}, {}, 0
    for job, res in zip(jobs[:-1], results[:-1], strict=True):
        k = job.fold
        for e in job.held:
            keys[e.site_id] = oos_key(key, f"fold{k}", inp.tile_key(e.site_id), params, env)
        fold_ckpts[str(k)] = fold_checkpoint(k)
        records.append({"fold": k, "held_out": len(job.held), **res["record"]})
        metric_sums += res["pixel_sums"]
        oos_sites += len(job.held)
    final_res = results[-1]
    final = UNet(ModelConfig(**final_res["config"]))
    final.load_state_dict(final_res["state"])
    other = sorted({r["threads"] for r in results} - {env["torch_threads"]})
    if other:
        notes.append(
            f"some networks trained with {other} torch thread(s), the stage with {env['torch_threads']}"
        )
    card = {
        "model": "U-Net (tasks/learn/model.py)",
        "data_version": version_id(version_dir),
        "data_hash": tiles.data_hash,
        "model_key": key,
        "classes": list(CLASSES),
        "bands": inp.band_names,
        "normalisation": {"mean": inp.mean.tolist(), "std": inp.std.tolist()},
        "architecture": {**final.config.__dict__, "n_parameters": n_parameters(final)},
        "params": params.model_dump(mode="json"),
        "device": device.type,
        "torch": torch_version(),
        "python": platform.python_version(),
        "torch_threads": env["torch_threads"],
        "training": {"folds": records, "final": final_res["record"], "class_pixels": class_px},
        "folds": {s: int(folds[s]) for s in site_ids},
        "fold_checkpoints": fold_ckpts,
        "sites": {
            "labelled": len(examples),
            "trained": len(usable),
            "by_role": pd.Series([e.role for e in usable]).value_counts().to_dict(),
            "masked_pixels": tiles.masked,
            "masked_fraction": tiles.masked / max(1, tiles.pixels),
        },
        "metrics": {"out_of_sample_pixel": metrics_from(metric_sums)},
        "reuse": REUSE_NOTE,
        "notes": notes,
    }
    save_checkpoint(unshare(model_dir / CHECKPOINT), final, card)
    unshare(model_dir / CARD).write_text(json.dumps(card, indent=2, default=float), encoding="utf-8")
    timings["write"] = time.perf_counter() - t2
    artifacts = {
        "oos_probabilities": folder_artifact(
            oos_dir, ds["oos_probabilities"].uri, reuse=reuse, name="oos_probabilities"
        ),
        "model": folder_artifact(model_dir, ds["model"].uri, "model*", reuse, "model"),
        "reuse_keys/train": write_keys(version_dir, "train", {**keys, MODEL_UNIT: key}, (), reuse),
    }
    counts = {
        **base_counts,
        "oos_sites": oos_sites,
        "labelled_pixels_nodata_or_cloud": tiles.masked,
        "model_trained": 1,
        **reuse_counts("train", len(keys), 0),
    }
    notes.append("model trained")
    result = LearnStageResult(artifacts, timings, counts, notes)
    result.placement["networks"] = {r["name"]: r["worker"] for r in results}
    return result
