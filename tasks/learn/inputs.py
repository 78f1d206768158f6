"""What the learn stages read and how it is keyed: sites, grids, normalisation, targets, and the keys.

Shared by ``run`` (train-stage orchestration and reuse), ``folds`` (training the K folds and the final
model) and ``pseudo`` (pseudo-labels). See ``tasks.learn.run`` for what the keys decide.
"""

from __future__ import annotations

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
    window_key,
)
from tasks.learn.model import CLASSES, torch_version
from tasks.learn.params import LearnParams
from tasks.store.artifacts import file_hash, read_table
from tasks.store.folders import folder_record, previous_record
from tasks.store.grid import SiteGrid
from tasks.store.rasters import write_site_raster
from tasks.store.reuse import Reuse, code_key, content_key, read_keys, recorded_label_keys, site_label_keys
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
    "tasks.learn.inputs",
    "tasks.learn.site_inputs",
    "tasks.learn.tiles",
    "tasks.learn.folds",
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
    assignments_path: Path | None = None
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
            sites, paths = self.assignments["site_id"], (self.labels_path, self.assignments_path)
            recorded = recorded_label_keys(self.version_dir, sites, *paths) if all(paths) else None
            self._keys["labels"] = recorded or site_label_keys(self.labels, self.assignments)
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
        assignments_path=version_dir / ds["assignments"].uri,
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
