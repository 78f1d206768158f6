"""The learn stages over a version folder: ``train`` (K-fold + final model) and ``pseudo_labels``.

Like ``tasks/consensus/run.py``: read published artifacts from ``version_dir``, write this stage's
artifacts next to them, return a result with artifacts, timings, counts and notes for the manifest.
Torch runs in this process (the Prefect task decides which worker, hence which device, that is);
the device is CUDA when present, else the CPU with every core the process may use.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
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
    pixel_metrics,
    predict_sites,
)
from tasks.store.artifacts import bytes_hash, file_hash, read_table
from tasks.store.grid import SiteGrid
from tasks.store.rasters import write_site_raster
from tasks.store.stage_result import StageResult

DRAFT_PREFIX = ".draft-"
CHECKPOINT = "model.pt"
CARD = "model_card.json"


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


def folder_artifact(folder: Path, rel: str, pattern: str = "*.tif") -> dict:
    files = sorted(folder.glob(pattern))
    return {"path": rel, "rows": len(files), "checksum": bytes_hash(*(file_hash(p).encode() for p in files))}


def version_id(version_dir: Path) -> str:
    name = Path(version_dir).name
    return name[len(DRAFT_PREFIX) :] if name.startswith(DRAFT_PREFIX) else name


@dataclass
class Inputs:
    """What both stages read: sites, per-site grids, scene paths, normalisation, labels per site."""

    sites: pd.DataFrame
    grids: dict[str, SiteGrid]
    scenes: dict[str, str]
    mean: np.ndarray
    std: np.ndarray
    band_names: list[str]
    refs: dict[str, list]
    voters: dict[str, list[list]]
    consensus_dir: Path
    cloud_threshold: float | None

    @property
    def labelled(self) -> list[str]:
        """Sites with a reference or a consensus raster, in site order."""
        have = {p.stem for p in self.consensus_dir.glob("*.tif")} | set(self.refs)
        return [s for s in self.sites["site_id"] if s in have]

    def role(self, site_id: str) -> str:
        return "gold" if site_id in self.refs else str(self._roles[site_id])

    def __post_init__(self):
        self._roles = dict(zip(self.sites["site_id"], self.sites["role"], strict=True))

    def pixels(self, site_id: str, mean=None, std=None) -> SitePixels | None:
        """The site's normalised tile, or None when its scene file is missing (a defined result)."""
        scene = self.sites.loc[self.sites["site_id"] == site_id, "scene_id"].iloc[0]
        path = self.scenes.get(str(scene))
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
        if site_id in self.refs:
            return gold_target(grid, self.refs[site_id], params.boundary_px), np.ones(
                (grid.height, grid.width), np.float32
            )
        prob, risk = read_consensus(self.consensus_dir / f"{site_id}.tif")
        return consensus_target(prob, self.voters.get(site_id, []), grid, params), consensus_weight(risk)


def load_inputs(catalog: Catalog, version_dir: Path) -> Inputs:
    ds = catalog.datasets
    sites = read_table(version_dir / ds["sites"].uri).sort_values("site_id").reset_index(drop=True)
    tiles = read_table(version_dir / ds["tiles"].uri)
    labels = read_table(version_dir / ds["labels"].uri)
    assignments = read_table(version_dir / ds["assignments"].uri)
    mean, std, names = band_stats(tiles, sites)
    refs, voters = site_labels(labels, assignments, catalog.settings.reference_labellers)
    return Inputs(
        sites=sites,
        grids={g.site_id: g for g in (SiteGrid.from_row(r) for _, r in sites.iterrows())},
        scenes=scene_paths(catalog.input_path("imagery")),
        mean=mean,
        std=std,
        band_names=names,
        refs=refs,
        voters=voters,
        consensus_dir=version_dir / ds["consensus_rasters"].uri,
        cloud_threshold=catalog.settings.ingest.cloud_threshold,
    )


def run_train_stage(catalog: Catalog, version_dir: str | Path) -> LearnStageResult:
    """K-fold models -> ``oos_probabilities``; a final model on every labelled site -> ``model``."""
    version_dir = Path(version_dir)
    ds = catalog.datasets
    base = params_from_catalog(catalog)
    device, params = device_for(base)
    threads = configure_threads(params)
    timings: dict[str, float] = {}
    notes: list[str] = []
    t0 = time.perf_counter()
    inp = load_inputs(catalog, version_dir)
    examples: list[Example] = []
    valids: dict[str, np.ndarray] = {}
    no_imagery = []
    for site_id in inp.labelled:
        px = inp.pixels(site_id)
        if px is None:
            no_imagery.append(site_id)
            continue
        target, weight = inp.target(site_id, params)
        examples.append(Example(site_id, inp.role(site_id), px.x, target, weight * px.valid))
        valids[site_id] = px.valid
    if no_imagery:
        notes.append(
            f"labelled sites without imagery (no out-of-sample probabilities): {', '.join(no_imagery)}"
        )
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
    timings["load"] = time.perf_counter() - t0

    oos_dir = version_dir / ds["oos_probabilities"].uri
    model_dir = version_dir / ds["model"].uri
    oos_dir.mkdir(parents=True, exist_ok=True)
    model_dir.mkdir(parents=True, exist_ok=True)
    if len(usable) < 2:
        notes.append(f"{len(usable)} trainable labelled site(s): no model trained, no probabilities written")
        return LearnStageResult(
            {"oos_probabilities": folder_artifact(oos_dir, ds["oos_probabilities"].uri)},
            timings,
            {"labelled_sites": len(examples), "trained_sites": len(usable), "oos_sites": 0},
            notes,
            {"device": device.type, "torch_threads": threads},
        )

    t1 = time.perf_counter()
    folds = assign_folds([e.site_id for e in examples], [e.role for e in examples], params.folds, params.seed)
    records, oos_probs, oos_ex = [], [], []
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
        "classes": list(CLASSES),
        "bands": inp.band_names,
        "normalisation": {"mean": inp.mean.tolist(), "std": inp.std.tolist()},
        "architecture": {**final.config.__dict__, "n_parameters": n_parameters(final)},
        "params": params.model_dump(mode="json"),
        "device": device.type,
        "torch": torch_version(),
        "python": platform.python_version(),
        "torch_threads": threads,
        "training": {"folds": records, "final": final_rec, "class_pixels": class_px},
        "sites": {
            "labelled": len(examples),
            "trained": len(usable),
            "by_role": pd.Series([e.role for e in usable]).value_counts().to_dict(),
            "masked_pixels": masked,
            "masked_fraction": masked / max(1, sum(v.size for v in valids.values())),
        },
        "metrics": {"out_of_sample_pixel": metrics},
        "notes": notes,
    }
    save_checkpoint(model_dir / CHECKPOINT, final.cpu(), card)
    (model_dir / CARD).write_text(json.dumps(card, indent=2, default=float), encoding="utf-8")
    timings["write"] = time.perf_counter() - t2 - timings["final"]
    artifacts = {
        "oos_probabilities": folder_artifact(oos_dir, ds["oos_probabilities"].uri),
        "model": folder_artifact(model_dir, ds["model"].uri, "model*"),
    }
    counts = {
        "labelled_sites": len(examples),
        "trained_sites": len(usable),
        "oos_sites": len(oos_ex),
        "labelled_sites_without_imagery": len(no_imagery),
        "labelled_pixels_nodata_or_cloud": masked,
    }
    return LearnStageResult(
        artifacts, timings, counts, notes, {"device": device.type, "torch_threads": threads}
    )


def run_pseudo_label_stage(catalog: Catalog, version_dir: str | Path, model_loader=None) -> LearnStageResult:
    """Predict unlabelled (and single-labeller) sites, vectorise, threshold; see ``tasks.learn.pseudo``."""
    from tasks.learn.pseudo import pseudo_label_stage

    return pseudo_label_stage(catalog, Path(version_dir), model_loader)
