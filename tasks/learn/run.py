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

Fold checkpoints (``model/model_fold<k>.pt``) are saved with the final model so that any OOS raster can
be predicted again, and every prediction pads its batches to a fixed size, so a linked raster equals a
recomputed one bit for bit: a run with ``Reuse(prev, enabled=False)`` publishes the same outputs.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio

from schemas.catalog import Catalog
from tasks.learn.data import (
    SitePixels,
    band_stats,
    consensus_target,
    consensus_weight,
    gold_target,
    read_consensus,
    read_site,
    scene_paths,
    site_labels,
    window_key,
)
from tasks.learn.model import CLASSES, n_parameters, save_checkpoint, torch_version
from tasks.learn.params import LearnParams, params_from_catalog
from tasks.learn.train import (
    Example,
    assign_folds,
    class_coverage,
    configure_threads,
    device_for,
    fit,
    load_for_inference,
    pixel_metrics,
    predict_sites,
)
from tasks.store.artifacts import bytes_hash, file_hash, read_table, unshare
from tasks.store.folders import folder_record, previous_record
from tasks.store.grid import SiteGrid
from tasks.store.rasters import write_site_raster
from tasks.store.reuse import (
    Reuse,
    code_key,
    content_key,
    link_or_copy,
    read_keys,
    reuse_counts,
    site_label_keys,
    write_keys,
)
from tasks.store.stage_result import StageResult

DRAFT_PREFIX = ".draft-"
CHECKPOINT = "model.pt"
CARD = "model_card.json"
MODEL_UNIT = "__model__"  # the model's key in reuse_keys/train (the other units are site ids)
CHUNK = 64  # sites read and predicted at a time: memory stays O(chunk)
# The code a model and its probabilities depend on (not the label-issues modules of tasks/learn).
TRAIN_CODE = (
    "tasks.learn.data",
    "tasks.learn.model",
    "tasks.learn.params",
    "tasks.learn.train",
    "tasks.learn.run",
    "tasks.store.artifacts",
    "tasks.store.grid",
    "tasks.store.rasters",
)
REUSE_NOTE = (
    "A later version may keep this model (reprocess after a label change, refit=False): sites labelled "
    "after it was trained then get out-of-sample probabilities from this final model, which never trained "
    "on them; the other sites keep those of their fold model (model_fold<k>.pt)."
)


def fold_checkpoint(k: int) -> str:
    return f"model_fold{k}.pt"


@dataclass
class LearnStageResult(StageResult):
    """Artifact records of the train / pseudo_labels stages, plus where the model ran."""

    placement: dict = field(default_factory=dict)


def write_prob_raster(path: Path, grid: SiteGrid, prob: np.ndarray) -> None:
    """3-band float32 GeoTIFF (background, interior, boundary) on the site grid; NaN = no valid input."""
    write_site_raster(path, grid, prob, CLASSES)


def read_prob_raster(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read().astype(np.float32)


def folder_artifact(
    folder: Path, rel: str, pattern: str = "*.tif", reuse: Reuse | None = None, name: str | None = None
) -> dict:
    """Manifest record of a folder artifact; files linked from the previous version (artifact ``name``)
    keep the hash its manifest recorded instead of being read again (``tasks.store.folders``)."""
    prev_folder, prev = previous_record(reuse.previous if reuse else None, name or rel)
    return folder_record(folder, rel, pattern, prev_folder, prev)


def version_id(version_dir: Path) -> str:
    name = Path(version_dir).name
    return name[len(DRAFT_PREFIX) :] if name.startswith(DRAFT_PREFIX) else name


@dataclass
class Inputs:
    """What both stages read: sites, per-site grids, scene paths, normalisation, labels per site.

    The polygons (``labels``, hence ``refs`` and ``voters``) are read on first use: a stage that keeps
    its model and thresholds never needs them (which sites are gold comes from the assignments)."""

    sites: pd.DataFrame
    grids: dict[str, SiteGrid]
    scenes: dict[str, str]
    mean: np.ndarray
    std: np.ndarray
    band_names: list[str]
    consensus_dir: Path
    cloud_threshold: float | None
    version_dir: Path
    assignments: pd.DataFrame = field(repr=False, default=None)
    labels_path: Path | None = None
    reference_labellers: tuple[str, ...] = ()

    @property
    def labelled(self) -> list[str]:
        """Sites with a reference or a consensus raster, in site order."""
        if self._labelled is None:
            have = {p.stem for p in self.consensus_dir.glob("*.tif")} | self.ref_sites
            self._labelled = [s for s in self.sites["site_id"] if s in have]
        return self._labelled

    def role(self, site_id: str) -> str:
        return "gold" if site_id in self.ref_sites else str(self._roles[site_id])

    def __post_init__(self):
        self._roles = dict(zip(self.sites["site_id"], self.sites["role"], strict=True))
        self._scene = dict(zip(self.sites["site_id"], self.sites["scene_id"].astype(str), strict=True))
        self._keys: dict[str, dict] = {}
        self._tile_keys: dict[str, str | None] = {}
        self._labelled: list[str] | None = None
        self._labels: pd.DataFrame | None = None
        self._site_labels: tuple[dict, dict] | None = None
        done = self.assignments[self.assignments["status"] == "completed"]
        is_ref = done["is_reference"].astype(bool) | done["labeller_id"].isin(list(self.reference_labellers))
        self.ref_sites: set[str] = set(done.loc[is_ref, "site_id"].astype(str))  # = set(self.refs)

    @property
    def labels(self) -> pd.DataFrame:
        if self._labels is None:
            self._labels = read_table(self.labels_path)
        return self._labels

    @property
    def refs(self) -> dict[str, list]:
        """Per gold site: the reference polygons (``site_labels``)."""
        return self._polygons()[0]

    @property
    def voters(self) -> dict[str, list[list]]:
        """Per site: each voter's polygons (``site_labels``)."""
        return self._polygons()[1]

    def _polygons(self) -> tuple[dict, dict]:
        if self._site_labels is None:
            self._site_labels = site_labels(self.labels, self.assignments, self.reference_labellers)
        return self._site_labels

    def scene_path(self, site_id: str) -> str | None:
        """The site's scene file, None when it is missing."""
        return self.scenes.get(self._scene[site_id])

    def pixels(self, site_id: str, mean=None, std=None) -> SitePixels | None:
        """The site's normalised tile, or None when its scene file is missing (a defined result)."""
        path = self.scene_path(site_id)
        if path is None:
            return None
        return read_site(
            path,
            self.grids[site_id],
            self.mean if mean is None else mean,
            self.std if std is None else std,
            self.cloud_threshold,
        )

    def target(self, site_id: str, params: LearnParams) -> tuple[np.ndarray, np.ndarray]:
        """(classes, weights) of a labelled site: the reference on gold sites, else the consensus."""
        grid = self.grids[site_id]
        if site_id in self.ref_sites:
            return gold_target(grid, self.refs[site_id], params.boundary_px), np.ones(
                (grid.height, grid.width), np.float32
            )
        prob, risk = read_consensus(self.consensus_dir / f"{site_id}.tif")
        return consensus_target(prob, self.voters.get(site_id, []), grid, params), consensus_weight(risk)

    # -------------------------------------------------------------------------------------- keys
    def upstream_keys(self, stage: str) -> dict[str, tuple[str, str]]:
        if stage not in self._keys:
            self._keys[stage] = read_keys(self.version_dir, stage)
        return self._keys[stage]

    def tile_key(self, site_id: str) -> str | None:
        """Key of the pixels the site's tile reads (None: no imagery). The ingest stage's key of the
        (site, scene) window; without one, the content of the window itself (read once more)."""
        if site_id not in self._tile_keys:
            path = self.scene_path(site_id)
            rec = self.upstream_keys("ingest").get(f"{site_id}/{self._scene[site_id]}")
            if path is None:
                key = None
            elif rec is not None:
                key = content_key("ingest", rec[0], self.cloud_threshold)
            else:
                key = content_key("window", window_key(path, self.grids[site_id]), self.cloud_threshold)
            self._tile_keys[site_id] = key
        return self._tile_keys[site_id]

    def target_key(self, site_id: str) -> str:
        """Key of what ``target`` reads: the reference polygons (gold) or the consensus raster plus the
        voters' polygons; the consensus stage's site key, else the raster file's hash."""
        if "labels" not in self._keys:
            self._keys["labels"] = site_label_keys(self.labels, self.assignments)
        label_key = self._keys["labels"].get(site_id)
        if site_id in self.ref_sites:
            return content_key("gold", label_key)
        rec = self.upstream_keys("consensus").get(site_id)
        cons = rec[0] if rec is not None else file_hash(self.consensus_dir / f"{site_id}.tif")
        return content_key("consensus", cons, label_key)


def load_inputs(catalog: Catalog, version_dir: Path) -> Inputs:
    ds = catalog.datasets
    sites = read_table(version_dir / ds["sites"].uri).sort_values("site_id").reset_index(drop=True)
    tiles = read_table(version_dir / ds["tiles"].uri)
    assignments = read_table(version_dir / ds["assignments"].uri)
    mean, std, names = band_stats(tiles, sites)
    return Inputs(
        sites=sites,
        grids={g.site_id: g for g in (SiteGrid.from_row(r) for r in sites.to_dict("records"))},
        scenes=scene_paths(catalog.input_path("imagery")),
        mean=mean,
        std=std,
        band_names=names,
        consensus_dir=version_dir / ds["consensus_rasters"].uri,
        cloud_threshold=catalog.settings.ingest.cloud_threshold,
        version_dir=Path(version_dir),
        assignments=assignments,
        labels_path=version_dir / ds["labels"].uri,
        reference_labellers=tuple(catalog.settings.reference_labellers),
    )


def environment(device, threads: int) -> dict:
    """What else a prediction's bits depend on: kernels differ by device, thread count and torch."""
    return {"device": device.type, "torch_threads": threads, "torch": torch_version()}


def model_key(
    inp: Inputs, site_ids: list[str], folds: dict[str, int], params: LearnParams, env: dict, catalog
) -> str:
    """Key of a training run: every training input (see the module docstring) and the code."""
    return content_key(
        "model",
        [(s, inp.role(s), inp.target_key(s), inp.tile_key(s)) for s in sorted(site_ids)],
        sorted(folds.items()),
        inp.mean,
        inp.std,
        inp.band_names,
        params.model_dump(mode="json"),
        env,
        {"reference_labellers": list(catalog.settings.reference_labellers)},
        code_key(*TRAIN_CODE),
    )


def oos_key(key: str, source: str, tile_key: str | None, params: LearnParams, env: dict) -> str:
    """Key of one OOS raster: the model (``key``) and which of its networks (``source``) predicted it."""
    return content_key(
        "oos", key, source, tile_key, params.model_dump(mode="json"), env, code_key(*TRAIN_CODE)
    )


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
        result.placement = placement
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
    (nothing of a new model's is reused)."""
    ds = catalog.datasets
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    examples: list[Example] = []
    valids: dict[str, np.ndarray] = {}
    for site_id in site_ids:
        px = inp.pixels(site_id)
        target, weight = inp.target(site_id, params)
        examples.append(Example(site_id, inp.role(site_id), px.x, target, weight * px.valid))
        valids[site_id] = px.valid
    usable = [
        e
        for e in examples
        if valids[e.site_id].mean() >= params.min_valid_fraction and float(e.weight.sum()) > 0
    ]
    if len(usable) < len(examples):
        skipped = sorted({e.site_id for e in examples} - {e.site_id for e in usable})
        notes.append(f"not trained on (nodata/cloud or no confident pixel): {', '.join(skipped)}")
    masked = int(sum((~v).sum() for v in valids.values()))  # nodata/cloud: weight 0, output NaN
    class_px, class_notes = class_coverage(usable)
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
    records, oos_probs, oos_ex, keys, fold_ckpts = [], [], [], {}, {}
    for k in range(params.folds):
        train_ex = [e for e in usable if folds[e.site_id] != k]
        held = [e for e in examples if folds[e.site_id] == k]
        if not train_ex or not held:
            notes.append(f"fold {k}: nothing to train on or to hold out; its sites get no probabilities")
            continue
        model, rec = fit(train_ex, params, params.seed + 1 + k, device)
        probs = predict_sites(model, [e.x for e in held], [valids[e.site_id] for e in held], params, device)
        for e, p in zip(held, probs, strict=True):
            write_prob_raster(oos_dir / f"{e.site_id}.tif", inp.grids[e.site_id], p)
            keys[e.site_id] = oos_key(key, f"fold{k}", inp.tile_key(e.site_id), params, env)
        fold_ckpts[str(k)] = fold_checkpoint(k)
        save_checkpoint(
            unshare(model_dir / fold_ckpts[str(k)]),
            model.cpu(),
            {"model_key": key, "fold": k, "training": rec},
        )
        records.append({"fold": k, "held_out": len(held), **rec})
        oos_probs += probs
        oos_ex += held
    timings["kfold"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    final, final_rec = fit(usable, params, params.seed, device)
    timings["final"] = time.perf_counter() - t2
    metrics = pixel_metrics(oos_probs, oos_ex)
    card = {
        "model": "U-Net (tasks/learn/model.py)",
        "data_version": version_id(version_dir),
        "data_hash": bytes_hash(*(b for e in usable for b in (e.site_id.encode(), e.x, e.target, e.weight))),
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
        "training": {"folds": records, "final": final_rec, "class_pixels": class_px},
        "folds": {s: int(folds[s]) for s in site_ids},
        "fold_checkpoints": fold_ckpts,
        "sites": {
            "labelled": len(examples),
            "trained": len(usable),
            "by_role": pd.Series([e.role for e in usable]).value_counts().to_dict(),
            "masked_pixels": masked,
            "masked_fraction": masked / max(1, sum(v.size for v in valids.values())),
        },
        "metrics": {"out_of_sample_pixel": metrics},
        "reuse": REUSE_NOTE,
        "notes": notes,
    }
    save_checkpoint(unshare(model_dir / CHECKPOINT), final.cpu(), card)
    unshare(model_dir / CARD).write_text(json.dumps(card, indent=2, default=float), encoding="utf-8")
    timings["write"] = time.perf_counter() - t2 - timings["final"]
    artifacts = {
        "oos_probabilities": folder_artifact(
            oos_dir, ds["oos_probabilities"].uri, reuse=reuse, name="oos_probabilities"
        ),
        "model": folder_artifact(model_dir, ds["model"].uri, "model*", reuse, "model"),
        "reuse_keys/train": write_keys(version_dir, "train", {**keys, MODEL_UNIT: key}, (), reuse),
    }
    counts = {
        **base_counts,
        "oos_sites": len(oos_ex),
        "labelled_pixels_nodata_or_cloud": masked,
        "model_trained": 1,
        **reuse_counts("train", len(keys), 0),
    }
    notes.append("model trained")
    return LearnStageResult(artifacts, timings, counts, notes)


def run_pseudo_label_stage(
    catalog: Catalog, version_dir: str | Path, model_loader=None, reuse: Reuse | None = None
) -> LearnStageResult:
    """Predict unlabelled (and single-labeller) sites, vectorise, threshold; see ``tasks.learn.pseudo``."""
    from tasks.learn.pseudo import pseudo_label_stage

    return pseudo_label_stage(catalog, Path(version_dir), model_loader, reuse)
