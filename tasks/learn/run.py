"""The learn stages over a version folder: ``train`` (K-fold + final model) and ``pseudo_labels``.

Like ``tasks/consensus/run.py``: read published artifacts from ``version_dir``, write this stage's
artifacts next to them, return a result with artifacts, timings, counts and notes for the manifest.
Torch runs in this process (the Prefect task decides which worker, hence which device, that is);
the device is CUDA when present, else the CPU with every core the process may use.

Incremental reprocessing (``tasks.store.reuse``). The model's key hashes everything training reads: per
labelled site its role, target key (gold: the site's label key; consensus: the consensus stage's site key
plus the label key, whose voters draw the internal edges) and tile key (the ingest stage's key of the
site's window), the fold assignment, the normalisation, the parameters, the device and thread count and
the code. Out-of-sample (OOS) rasters are units keyed by (model key, the model that predicted the site: a
fold or the final one, tile key, parameters, code). The train stage then does one of three things:

* **trained** -- a new model (every fold and the final one), every OOS raster predicted anew;
* **reused** -- ``reuse.refit`` and the key equals the previous version's: the model files are linked and
  so is every OOS raster whose key is unchanged (others are predicted with the linked fold checkpoints);
* **kept** -- ``reuse.refit`` is False (``reprocess`` after a label change) and the previous version has a
  model with fold checkpoints: it is kept as it is (linked, not trained; its key is carried), whatever
  labels changed. OOS rasters whose key is unchanged are linked; the others are predicted with the kept
  checkpoints: the site's fold model when the kept model had the site in its folds, else -- a site
  labelled after the model was trained -- the kept **final** model, which never trained on that site, so
  its probabilities are still out-of-sample. ``refit=True`` (the nightly refresh) retrains on everything.

Modules: ``inputs`` (what is read, and the keys), ``tiles`` (the labelled tiles on disk while training),
``folds`` (a new model: the fold networks and the final one as Dask tasks), this one (which of the three,
and the kept/reused path).

Fold checkpoints (``model/model_fold<k>.pt``) are saved with the final model so that any OOS raster can
be predicted again, and every prediction pads its batches to a fixed size, so a linked raster equals a
recomputed one bit for bit: a run with ``Reuse(prev, enabled=False)`` publishes the same outputs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from schemas.catalog import Catalog
from tasks.learn.folds import train_models
from tasks.learn.inputs import (
    CARD,
    CHECKPOINT,
    CHUNK,
    MODEL_UNIT,
    TRAIN_CODE,
    Inputs,
    LearnStageResult,
    environment,
    fold_checkpoint,
    folder_artifact,
    load_inputs,
    model_key,
    oos_key,
    read_prob_raster,
    write_prob_raster,
)
from tasks.learn.params import LearnParams, params_from_catalog
from tasks.learn.train import assign_folds, configure_threads, device_for, load_for_inference, predict_sites
from tasks.store.reuse import Reuse, link_or_copy, reuse_counts, write_keys

# What other modules import from here (``tasks.learn.pseudo``, ``tasks.learn.evaluate``, tests).
__all__ = [
    "CARD",
    "CHECKPOINT",
    "MODEL_UNIT",
    "TRAIN_CODE",
    "Inputs",
    "LearnStageResult",
    "environment",
    "fold_checkpoint",
    "folder_artifact",
    "load_inputs",
    "predict_into",
    "read_prob_raster",
    "run_pseudo_label_stage",
    "run_train_stage",
]


@dataclass
class PreviousModel:
    """The previous version's model folder and card (only when it can be kept: key and folds recorded)."""

    folder: Path
    card: dict

    @property
    def key(self) -> str:
        return str(self.card["model_key"])

    @cached_property
    def folds(self) -> dict[str, int]:
        return {str(s): int(k) for s, k in self.card["folds"].items()}

    def checkpoint(self, site_id: str) -> tuple[str, str] | None:
        """(source, checkpoint file) that predicts ``site_id`` out of sample: its fold model, or the final
        model for a site the model never saw; None when its fold was not trained."""
        k = self.folds.get(site_id)
        if k is None:
            return "final", CHECKPOINT
        name = self.card["fold_checkpoints"].get(str(k))
        return (f"fold{k}", name) if name else None


def previous_model(reuse: Reuse, uri: str) -> PreviousModel | None:
    if reuse.previous is None:
        return None
    folder = reuse.previous / uri
    if not (folder / CHECKPOINT).exists() or not (folder / CARD).exists():
        return None
    card = json.loads((folder / CARD).read_text(encoding="utf-8"))
    if "model_key" not in card or "folds" not in card or "fold_checkpoints" not in card:
        return None  # trained before fold checkpoints were kept: cannot predict its OOS rasters again
    if not all((folder / f).exists() for f in card["fold_checkpoints"].values()):
        return None
    return PreviousModel(folder, card)


def predict_into(
    todo: dict[str, str],
    model_dir: Path,
    out_dir: Path,
    inp: Inputs,
    mean: np.ndarray,
    std: np.ndarray,
    params: LearnParams,
    device,
    model_loader=None,
    each=None,
) -> tuple[list[str], list[str]]:
    """Predict ``todo`` (site -> checkpoint file in ``model_dir``) into ``out_dir/<site>.tif``, a chunk of
    sites at a time; ``each(pixels, probabilities)`` is called for every predicted site.

    ``model_loader(path, device)`` loads the final model (``model.pt``) when given; fold checkpoints load
    as ``fit`` leaves a network. Returns (sites predicted, sites without imagery).
    """
    done, no_imagery = [], []
    by_ckpt: dict[str, list[str]] = {}
    for s, ckpt in todo.items():
        by_ckpt.setdefault(ckpt, []).append(s)
    for ckpt, sites in sorted(by_ckpt.items()):
        if model_loader is not None and ckpt == CHECKPOINT:
            model, _ = model_loader(model_dir / ckpt, device)
        else:
            model, _ = load_for_inference(model_dir / ckpt, device, params)
        for i in range(0, len(sites), CHUNK):
            chunk = []
            for s in sites[i : i + CHUNK]:
                px = inp.pixels(s, mean, std)
                if px is None:
                    no_imagery.append(s)
                else:
                    chunk.append(px)
            probs = predict_sites(model, [c.x for c in chunk], [c.valid for c in chunk], params, device)
            for px, prob in zip(chunk, probs, strict=True):
                write_prob_raster(out_dir / f"{px.site_id}.tif", inp.grids[px.site_id], prob)
                if each is not None:
                    each(px, prob)
                done.append(px.site_id)
    return done, no_imagery


def link_or_predict(
    reuse: Reuse,
    stage: str,
    units: dict[str, tuple[str, str]],
    keys: dict[str, str],
    previous_dir: Path | None,
    out_dir: Path,
    predict,
) -> set[str]:
    """Link the rasters of units whose key is unchanged from ``previous_dir``; ``predict`` the others
    ({site: checkpoint}). Returns the linked units."""
    reusable = reuse.reusable(stage, keys)
    linked = set()
    for s in sorted(reusable):
        src = previous_dir / f"{s}.tif" if previous_dir is not None else None
        if src is not None and src.exists():
            link_or_copy(src, out_dir / f"{s}.tif")
            linked.add(s)
    todo = {s: ckpt for s, (_, ckpt) in units.items() if s not in linked}
    if todo:
        predict(todo)
    return linked


def run_train_stage(
    catalog: Catalog, version_dir: str | Path, reuse: Reuse | None = None
) -> LearnStageResult:
    """K-fold models -> ``oos_probabilities``; a final model on every labelled site -> ``model``.

    With ``reuse`` the model is trained, reused (same key, ``refit``) or kept (``refit=False``): see the
    module docstring. None behaves as a first run (train; keys are still written).
    """
    reuse = reuse or Reuse()
    version_dir = Path(version_dir)
    ds = catalog.datasets
    base = params_from_catalog(catalog)
    device, params = device_for(base)
    threads = configure_threads(params)
    env = environment(device, threads)
    placement = {"device": device.type, "torch_threads": threads}
    timings: dict[str, float] = {}
    notes: list[str] = []
    t0 = time.perf_counter()
    inp = load_inputs(catalog, version_dir)
    with_imagery = [s for s in inp.labelled if inp.scene_path(s) is not None]
    no_imagery = [s for s in inp.labelled if inp.scene_path(s) is None]
    if no_imagery:
        notes.append(
            f"labelled sites without imagery (no out-of-sample probabilities): {', '.join(no_imagery)}"
        )
    oos_dir = version_dir / ds["oos_probabilities"].uri
    model_dir = version_dir / ds["model"].uri
    oos_dir.mkdir(parents=True, exist_ok=True)
    model_dir.mkdir(parents=True, exist_ok=True)
    prev = previous_model(reuse, ds["model"].uri)
    prev_oos = reuse.previous / ds["oos_probabilities"].uri if reuse.previous else None

    key, folds = None, {}
    if reuse.refit or prev is None:
        folds = assign_folds(with_imagery, [inp.role(s) for s in with_imagery], params.folds, params.seed)
        key = model_key(inp, with_imagery, folds, params, env, catalog)
    if prev is not None and not reuse.refit:
        mode = "kept"
    elif prev is not None and prev.key == key and reuse.reusable("train", {MODEL_UNIT: key}):
        mode = "reused"
    else:
        mode = "trained"
    timings["load"] = time.perf_counter() - t0

    if mode == "trained":
        result = train_models(
            catalog, version_dir, inp, with_imagery, folds, key, params, device, env, reuse, notes
        )
        result.timings = {**timings, **result.timings}
        result.counts["labelled_sites_without_imagery"] = len(no_imagery)
        result.placement = {**placement, **result.placement}
        return result

    # ------------------------------------------------------------------ kept or reused: link, fill
    t1 = time.perf_counter()
    for f in sorted(prev.folder.iterdir()):
        if f.is_file():
            link_or_copy(f, model_dir / f.name)
    card, key = prev.card, prev.key
    units, unpredictable = {}, []
    for s in with_imagery:
        src = prev.checkpoint(s)
        if src is None:
            unpredictable.append(s)
        else:
            units[s] = src
    keys = {s: oos_key(key, src, inp.tile_key(s), params, env) for s, (src, _) in units.items()}
    mean = np.asarray(card["normalisation"]["mean"], np.float32)
    std = np.asarray(card["normalisation"]["std"], np.float32)

    def predict(todo):
        predict_into(todo, model_dir, oos_dir, inp, mean, std, params, device)

    linked = link_or_predict(reuse, "train", units, keys, prev_oos, oos_dir, predict)
    timings["oos"] = time.perf_counter() - t1
    newly = sorted(s for s, (src, _) in units.items() if src == "final")
    if mode == "kept":
        notes.append(
            f"model kept from version {card.get('data_version')} (refit=False): not retrained"
            + (
                f"; {len(newly)} site(s) labelled since get out-of-sample probabilities from its final "
                f"model, which never trained on them: {', '.join(newly)}"
                if newly
                else ""
            )
        )
    else:
        notes.append(
            f"model reused from version {card.get('data_version')}: its key (training inputs, folds, "
            "parameters, code) is unchanged"
        )
    if unpredictable:
        notes.append(f"fold not trained, no out-of-sample probabilities: {', '.join(unpredictable)}")
    carried = linked | ({MODEL_UNIT} if MODEL_UNIT in reuse.previous_keys("train") else set())
    artifacts = {
        "oos_probabilities": folder_artifact(
            oos_dir, ds["oos_probabilities"].uri, reuse=reuse, name="oos_probabilities"
        ),
        "model": folder_artifact(model_dir, ds["model"].uri, "model*", reuse, "model"),
        "reuse_keys/train": write_keys(version_dir, "train", {**keys, MODEL_UNIT: key}, carried, reuse),
    }
    counts = {
        "labelled_sites": len(with_imagery),
        "trained_sites": int(card.get("sites", {}).get("trained", 0)),
        "oos_sites": len(units),
        "oos_sites_from_final_model": len(newly),
        "labelled_sites_without_imagery": len(no_imagery),
        "model_trained": 0,
        "model_reused": int(mode == "reused"),
        "model_kept": int(mode == "kept"),
        **reuse_counts("train", len(units), len(linked)),
    }
    return LearnStageResult(artifacts, timings, counts, notes, placement)


def run_pseudo_label_stage(
    catalog: Catalog, version_dir: str | Path, model_loader=None, reuse: Reuse | None = None
) -> LearnStageResult:
    """Predict unlabelled (and single-labeller) sites, vectorise, threshold; see ``tasks.learn.pseudo``."""
    from tasks.learn.pseudo import pseudo_label_stage

    return pseudo_label_stage(catalog, Path(version_dir), model_loader, reuse)
