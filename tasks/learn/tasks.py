"""Prefect wrappers of the learn stages: thin, so the flow decides placement (``dask.annotate``).

Submit them with ``.submit``/``.map`` under ``dask.annotate(resources={"GPU": 1})``: a direct call runs in
the flow process and pins nothing. The loaded model is cached per worker process, keyed by checkpoint
path and modification time, so repeated inference tasks on one GPU worker load it once.
"""

from __future__ import annotations

import os
import threading
from dataclasses import asdict
from pathlib import Path

from prefect import task

from schemas.catalog import load_catalog
from tasks.store.errors import retry_on_transient_io
from tasks.store.reuse import Reuse

_MODELS: dict[tuple[str, int, str], tuple] = {}
_LOCK = threading.Lock()


def cached_model(path: str | Path, device) -> tuple:
    """(model, card) for a checkpoint, loaded once per worker process and device."""
    from tasks.learn.model import load_checkpoint

    path = Path(path).resolve()
    key = (str(path), os.stat(path).st_mtime_ns, str(device))
    with _LOCK:
        if key not in _MODELS:
            _MODELS.clear()  # one model per worker: a new version's model replaces the old one
            _MODELS[key] = load_checkpoint(path, device)
        return _MODELS[key]


def _worker_address() -> str | None:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return None


@task(name="train", retries=1, retry_delay_seconds=[5], retry_condition_fn=retry_on_transient_io)
def train_task(
    catalog_path: str, version_dir: str, upstream: dict | None = None, reuse: Reuse | None = None
) -> dict:
    """K-fold out-of-sample probabilities and the final model, into the version draft ``version_dir``
    (trained, reused or kept per ``reuse``: see ``tasks.learn.run``). A new model's networks run as Dask
    tasks of their own on this kind of worker (``tasks.learn.folds``); torch uses the worker's threads."""
    from tasks.learn.run import run_train_stage

    result = run_train_stage(load_catalog(catalog_path), version_dir, reuse=reuse)
    result.placement["worker"] = _worker_address()
    return asdict(result)


@task(name="pseudo_labels", retries=1, retry_delay_seconds=[5], retry_condition_fn=retry_on_transient_io)
def pseudo_labels_task(
    catalog_path: str, version_dir: str, upstream: dict | None = None, reuse: Reuse | None = None
) -> dict:
    """Thresholds, pseudo-label probabilities and polygons (after ``train_task`` wrote the model)."""
    from tasks.learn.run import run_pseudo_label_stage

    result = run_pseudo_label_stage(
        load_catalog(catalog_path), version_dir, model_loader=cached_model, reuse=reuse
    )
    result.placement["worker"] = _worker_address()
    return asdict(result)
