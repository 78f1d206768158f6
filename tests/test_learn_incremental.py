"""Incremental train / pseudo_labels: a model reused by key, kept on reprocess, retrained on refresh.

One tiny demo region (18 sites), a few optimiser steps per model. Versions are built by calling the stage
functions in order (ingest, consensus, train, pseudo_labels) into ``versions/<name>``; a label change is
made to the inputs between versions: site S00005 (unlabelled, one pending assignment) gets its first
completed labels, and one crowd polygon of the multi-labeller site S00007 is dropped.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
import torch
import yaml

from schemas.catalog import load_catalog
from tasks.consensus.run import run_consensus_stage
from tasks.ingest.stage import run_ingest
from tasks.learn.model import load_checkpoint
from tasks.learn.run import MODEL_UNIT, run_pseudo_label_stage, run_train_stage
from tasks.store.artifacts import read_table
from tasks.store.reuse import Reuse, read_keys

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "steps": 8,
    "batch_size": 2,
    "base_width": 4,
    "crop_px": 32,
    "min_support": 1,
    "torch_threads": 1,
    "infer_batch_size": 4,
}
NEW_SITE, CHANGED_SITE = "S00005", "S00007"
RASTERS = ("oos_probabilities", "pseudo_probabilities")


class Region:
    """A copy of the demo region whose versions are built stage by stage."""

    def __init__(self, root: Path):
        self.root = root
        self.catalog = load_catalog(root / "data_catalog.yaml")

    def upstream(self, name: str) -> Path:
        vdir = self.root / "versions" / name
        run_ingest(self.catalog, vdir)
        run_consensus_stage(self.catalog, vdir)
        return vdir

    def clone(self, src: Path, name: str) -> Path:
        """A copy of a version's ingest + consensus artifacts (before its learn stages ran)."""
        vdir = self.root / "versions" / name
        shutil.copytree(src, vdir)
        return vdir

    def learn(self, vdir: Path, reuse: Reuse | None = None):
        return run_train_stage(self.catalog, vdir, reuse=reuse), run_pseudo_label_stage(
            self.catalog, vdir, reuse=reuse
        )


def change_labels(root: Path) -> None:
    """S00005: its pending assignment completed with the true fields; S00007: one crowd polygon less."""
    truth = gpd.read_parquet(root / "truth" / "fields.parquet")
    labels = gpd.read_parquet(root / "inputs" / "labels.parquet")
    assignments = pd.read_csv(root / "inputs" / "assignments.csv")
    pending = (assignments["site_id"] == NEW_SITE) & assignments["completed_at"].isna()
    assert pending.sum() == 1
    assignments.loc[pending, "completed_at"] = "2026-05-01T10:00:00Z"
    labeller = assignments.loc[pending, "labeller_id"].iloc[0]
    new = truth[truth["site_id"] == NEW_SITE].to_crs(labels.crs)
    new = gpd.GeoDataFrame(
        {"site_id": NEW_SITE, "labeller_id": labeller, "label": new["label"].to_numpy()},
        geometry=new.geometry.to_numpy(),
        crs=labels.crs,
    )
    crowd = labels.index[(labels["site_id"] == CHANGED_SITE) & (labels["labeller_id"] != "expert")]
    labels = pd.concat([labels.drop(index=crowd[:1]), new], ignore_index=True)
    labels.to_parquet(root / "inputs" / "labels.parquet")
    assignments.to_csv(root / "inputs" / "assignments.csv", index=False)


@pytest.fixture(scope="module")
def region(demo_root, tmp_path_factory) -> Region:
    root = tmp_path_factory.mktemp("incremental")
    shutil.copytree(demo_root / "inputs", root / "inputs")
    shutil.copytree(demo_root / "truth", root / "truth")
    raw = yaml.safe_load((REPO / "data_catalog.yaml").read_text(encoding="utf-8"))
    raw["root"] = "."
    raw["settings"]["learn"] = TINY
    (root / "data_catalog.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return Region(root)


@pytest.fixture(scope="module")
def versions(region) -> dict:
    """v1: first run; v2: unchanged inputs, Reuse(v1); then the label change and its upstream."""
    v1 = region.upstream("v1")
    v2 = region.clone(v1, "v2")
    v2_full = region.clone(v1, "v2_full")
    out = {"v1": (v1, *region.learn(v1)), "v2": (v2, *region.learn(v2, Reuse(str(v1))))}
    out["v2_full"] = (v2_full, *region.learn(v2_full, Reuse(str(v1), enabled=False)))
    change_labels(region.root)
    out["changed"] = region.upstream("changed")
    return out


def files(vdir: Path, folder: str) -> dict[str, Path]:
    return {p.name: p for p in sorted((vdir / folder).iterdir())}


def same_inode(a: Path, b: Path) -> bool:
    return os.stat(a).st_ino == os.stat(b).st_ino


def assert_same_outputs(a: Path, b: Path) -> None:
    """Every learn output of two versions equal: rasters pixel for pixel, tables row for row."""
    for folder in RASTERS:
        fa, fb = files(a, folder), files(b, folder)
        assert set(fa) == set(fb) and fa, folder
        for name in fa:
            with rasterio.open(fa[name]) as ra, rasterio.open(fb[name]) as rb:
                np.testing.assert_array_equal(ra.read(), rb.read(), err_msg=f"{folder}/{name}")
    for name in ("pseudo_labels", "pseudo_label_thresholds.parquet"):
        ta, tb = read_table(a / name), read_table(b / name)
        if "geometry" in ta:
            ta["geometry"] = shapely.to_wkb(np.asarray(ta["geometry"], dtype=object))
            tb["geometry"] = shapely.to_wkb(np.asarray(tb["geometry"], dtype=object))
        pd.testing.assert_frame_equal(pd.DataFrame(ta), pd.DataFrame(tb))
    assert set(files(a, "model")) == set(files(b, "model"))
    for name in files(a, "model"):  # the weights (a card also records timings, version)
        if name.endswith(".pt"):
            sa, sb = (load_checkpoint(v / "model" / name)[0].state_dict() for v in (a, b))
            assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    ka, kb = read_keys(a, "train"), read_keys(b, "train")
    assert {u: k for u, (k, _) in ka.items()} == {u: k for u, (k, _) in kb.items()}


def model_key(vdir: Path) -> str:
    return read_keys(vdir, "train")[MODEL_UNIT][0]


def test_unchanged_inputs_reuse_the_model_and_every_raster(versions):
    v1, train1, pseudo1 = versions["v1"]
    v2, train2, pseudo2 = versions["v2"]
    assert train1.counts["model_trained"] == 1 and train1.counts["train_recomputed"] > 0
    assert train2.counts["model_reused"] == 1 and train2.counts["model_trained"] == 0
    assert (
        train2.counts["train_recomputed"] == 0 and train2.counts["train_reused"] == train1.counts["oos_sites"]
    )
    assert (
        pseudo2.counts["pseudo_labels_recomputed"] == 0 and pseudo2.counts["pseudo_thresholds_computed"] == 0
    )
    assert pseudo2.counts["pseudo_labels_reused"] == pseudo1.counts["pseudo_sites"] > 0
    for folder in ("model", *RASTERS):  # linked, not copied
        for name, path in files(v1, folder).items():
            assert same_inode(path, v2 / folder / name), f"{folder}/{name}"
    assert_same_outputs(v1, v2)
    keys = read_keys(v2, "train")
    assert keys[MODEL_UNIT] == (model_key(v1), "v1") and {c for _, c in keys.values()} == {"v1"}
    card = json.loads((v1 / "model" / "model_card.json").read_text())
    assert card["model_key"] == model_key(v1) and set(card["fold_checkpoints"]) == {"0", "1", "2"}


def test_a_full_refresh_retrains_and_publishes_the_same_outputs(versions):
    """Reuse(v1, enabled=False): everything recomputed (training is deterministic, batches padded)."""
    v2, _, _ = versions["v2"]
    full, train, pseudo = versions["v2_full"]
    assert train.counts["model_trained"] == 1 and train.counts["train_reused"] == 0
    assert pseudo.counts["pseudo_labels_reused"] == 0
    assert not same_inode(v2 / "model" / "model.pt", full / "model" / "model.pt")
    assert_same_outputs(v2, full)


def test_reprocess_keeps_the_model_and_recomputes_only_the_changed_sites(versions, region):
    """refit=False after a label change: the model is kept (same file), the newly labelled site gets
    out-of-sample probabilities from the kept final model, the rest is linked; the same outputs as a
    run that recomputes every unit with the kept model."""
    v2, train2, pseudo2 = versions["v2"]
    v3 = region.clone(versions["changed"], "v3")
    v3_full = region.clone(versions["changed"], "v3_full")
    train, pseudo = region.learn(v3, Reuse(str(v2), refit=False))
    train_full, pseudo_full = region.learn(v3_full, Reuse(str(v2), enabled=False, refit=False))

    for name, path in files(v3, "model").items():
        assert path.read_bytes() == (v3_full / "model" / name).read_bytes()
    for t in (train, train_full):
        assert t.counts["model_trained"] == 0 and t.counts["model_kept"] == 1 and "fit" not in t.timings
    for name, path in files(v2, "model").items():
        assert same_inode(path, v3 / "model" / name) and same_inode(path, v3_full / "model" / name)
    assert model_key(v3) == model_key(v2) == model_key(v3_full)
    assert any("kept" in n and NEW_SITE in n for n in train.notes)

    assert train.counts["oos_sites"] == train2.counts["oos_sites"] + 1
    assert train.counts["train_recomputed"] == 1 and train.counts["oos_sites_from_final_model"] == 1
    computed = {u: c for u, (_, c) in read_keys(v3, "train").items()}
    assert computed.pop(NEW_SITE) == "v3" and set(computed.values()) == {"v1"}
    assert pseudo.counts["pseudo_thresholds_computed"] == 0
    assert pseudo.counts["pseudo_labels_recomputed"] == 1  # S00005: unlabelled -> single second opinion
    assert pseudo.counts["pseudo_labels_units"] == pseudo2.counts["pseudo_labels_units"]
    assert read_keys(v3, "pseudo_labels")[NEW_SITE][1] == "v3"
    assert train_full.counts["train_reused"] == 0 and pseudo_full.counts["pseudo_labels_reused"] == 0

    thr2, thr3 = (
        read_table(v2 / "pseudo_label_thresholds.parquet"),
        read_table(v3_full / "pseudo_label_thresholds.parquet"),
    )
    pd.testing.assert_frame_equal(thr2, thr3)  # carried for the kept model, even in a full recompute
    assert_same_outputs(v3, v3_full)
    for name, path in files(v2, "oos_probabilities").items():  # the changed site's OOS raster linked
        assert same_inode(path, v3 / "oos_probabilities" / name)


def test_refresh_after_a_label_change_retrains(versions, region):
    v2, _, _ = versions["v2"]
    v4 = region.clone(versions["changed"], "v4")
    train, pseudo = region.learn(v4, Reuse(str(v2), refit=True))
    assert train.counts["model_trained"] == 1 and train.counts["train_reused"] == 0
    assert model_key(v4) != model_key(v2)
    assert not same_inode(v2 / "model" / "model.pt", v4 / "model" / "model.pt")
    assert pseudo.counts["pseudo_thresholds_computed"] == 1 and pseudo.counts["pseudo_labels_reused"] == 0


def test_without_upstream_keys_the_content_is_keyed(versions, region):
    """Versions whose ingest and consensus stages recorded no keys key tiles and consensus rasters by
    their content: still reused when unchanged, never confused with keyed versions."""
    v1, _, _ = versions["v1"]
    bare = []
    for name in ("bare1", "bare2"):
        vdir = region.root / "versions" / name
        shutil.copytree(
            v1, vdir, ignore=shutil.ignore_patterns(*RASTERS[:1], "model", "pseudo*", "reuse_keys")
        )
        bare.append(vdir)
    train1, _ = region.learn(bare[0], Reuse(str(v1)))
    train2, _ = region.learn(bare[1], Reuse(str(bare[0])))
    assert train1.counts["model_trained"] == 1 and model_key(bare[0]) != model_key(v1)
    assert train2.counts["model_reused"] == 1 and model_key(bare[1]) == model_key(bare[0])


def test_a_tiles_probabilities_do_not_depend_on_the_tiles_predicted_with_it():
    """A linked raster must equal a recomputed one, whatever else was predicted in the same batch."""
    from tasks.learn.model import ModelConfig, UNet, seed_everything, set_threads
    from tasks.learn.params import LearnParams
    from tasks.learn.train import predict_sites

    set_threads(2)
    seed_everything(0)
    model = UNet(ModelConfig(base_width=8, depth=3))
    params = LearnParams(infer_batch_size=8)
    xs = list(np.random.default_rng(0).normal(size=(6, 4, 96, 96)).astype(np.float32))
    valids = [np.ones((96, 96), bool)] * len(xs)
    together = predict_sites(model, xs, valids, params, torch.device("cpu"))
    for i in (0, 5):
        alone = predict_sites(model, xs[i : i + 1], valids[:1], params, torch.device("cpu"))[0]
        np.testing.assert_array_equal(alone, together[i])
