"""The ``pseudo_labels`` stage: thresholds from out-of-sample polygons, then pseudo-labels to publish.

1. On gold and multi-labeller sites, vectorise the out-of-sample probabilities and the targets with the
   same rule, match polygons (true positive at IoU >= ``match_iou``) and choose, per class, the lowest
   confidence threshold that reaches ``target_precision``. These sites were never seen by the model that
   predicted them, so the measured precision is an honest estimate for unseen sites.
2. Predict unlabelled sites with the final model; single-labeller sites get a second opinion (by default
   their out-of-sample probabilities, which never saw that labeller's polygons on that site).
3. Vectorise every prediction; a polygon is ``kept`` when its confidence reaches its class threshold.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from schemas.catalog import Catalog
from tasks.learn.model import load_checkpoint
from tasks.learn.params import LearnParams, params_from_catalog
from tasks.learn.run import (
    CHECKPOINT,
    Inputs,
    LearnStageResult,
    folder_artifact,
    load_inputs,
    read_prob_raster,
    write_prob_raster,
)
from tasks.learn.train import configure_threads, device_for, predict_sites
from tasks.learn.vectorise import (
    best_iou,
    choose_threshold,
    instance_confidence,
    instances,
    polygons,
    precision_at,
    target_instances,
)
from tasks.store.artifacts import write_table
from tasks.store.grid import SiteGrid

FIELD = "field"  # the one polygon class of the three-class (background/interior/boundary) model
POLYGON_COLUMNS = ["polygon_id", "site_id", "class", "confidence", "source", "kept", "geometry", "crs"]
CHUNK = 64  # sites read and predicted at a time: memory stays O(chunk)


def site_polygons(site_id: str, grid: SiteGrid, prob: np.ndarray, params: LearnParams, source: str) -> list:
    ids = instances(prob, params.grow_px, params.min_polygon_px)
    conf = instance_confidence(ids, prob, params.confidence)
    rows = []
    for i, geom in enumerate(polygons(ids, grid)):
        if geom is None:
            continue
        rows.append(
            {
                "polygon_id": f"{site_id}-p{i:04d}",
                "site_id": site_id,
                "class": FIELD,
                "confidence": float(np.clip(conf[i], 0.0, 1.0)),
                "source": source,
                "geometry": geom,
                "crs": grid.crs,
            }
        )
    return rows


def threshold_evidence(inp: Inputs, oos_dir: Path, params: LearnParams) -> tuple[pd.DataFrame, dict]:
    """Per out-of-sample polygon on the threshold sites: role, class, confidence, true positive; and the
    number of target polygons per role."""
    rows, n_targets = [], {}
    for site_id in inp.labelled:
        path, role = oos_dir / f"{site_id}.tif", inp.role(site_id)
        if role not in params.threshold_roles or not path.exists():
            continue
        prob = read_prob_raster(path)
        target, _ = inp.target(site_id, params)
        pred = instances(prob, params.grow_px, params.min_polygon_px)
        truth = target_instances(target, params.grow_px, params.min_polygon_px)
        bp, _ = best_iou(pred, truth)
        conf = instance_confidence(pred, prob, params.confidence)
        rows += [
            {"site_id": site_id, "role": role, "class": FIELD, "confidence": c, "tp": b >= params.match_iou}
            for c, b in zip(conf, bp, strict=True)
        ]
        n_targets[role] = n_targets.get(role, 0) + int(truth.max())
    return pd.DataFrame(rows, columns=["site_id", "role", "class", "confidence", "tp"]), n_targets


def choose_thresholds(
    evidence: pd.DataFrame, n_targets: dict, params: LearnParams
) -> tuple[pd.DataFrame, list]:
    """One row per class: the threshold, where it was measured (basis), what it gives on consensus sites."""
    notes = []
    gold = evidence["role"] == "gold"
    use_gold = params.gold_first and int(gold.sum()) >= params.min_support
    basis = evidence[gold] if use_gold else evidence
    n_basis = n_targets.get("gold", 0) if use_gold else sum(n_targets.values())
    if params.gold_first and not use_gold:
        notes.append(
            f"{int(gold.sum())} out-of-sample polygons on gold sites (< {params.min_support}): threshold "
            "chosen on gold and consensus sites, whose imperfect targets make it conservative"
        )
    thr = choose_threshold(
        basis["confidence"].to_numpy(),
        basis["tp"].to_numpy(),
        n_basis,
        params.target_precision,
        params.min_support,
        params.precision_z,
    )
    cons = evidence[~gold]
    at = precision_at(
        cons["confidence"].to_numpy(), cons["tp"].to_numpy(), n_targets.get("multi", 0), thr["threshold"]
    )
    row = {
        "class": FIELD,
        **thr,
        "basis": "gold" if use_gold else "+".join(params.threshold_roles),
        "consensus_precision": at["precision"],
        "consensus_recall": at["recall"],
        "target_precision": params.target_precision,
        "n_candidates": len(basis),
        "n_target_polygons": n_basis,
        "n_sites": int(basis["site_id"].nunique()),
    }
    if not np.isfinite(thr["threshold"]):
        notes.append(
            f"class {FIELD!r}: no threshold reaches precision {params.target_precision} on {len(basis)} "
            f"out-of-sample polygons ({row['basis']} sites); no pseudo-label is kept"
        )
    return pd.DataFrame([row]), notes


def pseudo_label_stage(catalog: Catalog, version_dir: Path, model_loader=None) -> LearnStageResult:
    ds = catalog.datasets
    device, params = device_for(params_from_catalog(catalog))
    threads = configure_threads(params)
    timings: dict[str, float] = {}
    notes: list[str] = []
    t0 = time.perf_counter()
    inp = load_inputs(catalog, version_dir)
    oos_dir = version_dir / ds["oos_probabilities"].uri
    out_dir = version_dir / ds["pseudo_probabilities"].uri
    out_dir.mkdir(parents=True, exist_ok=True)

    evidence, n_targets = threshold_evidence(inp, oos_dir, params)
    thresholds, thr_notes = choose_thresholds(evidence, n_targets, params)
    notes += thr_notes
    threshold = float(thresholds["threshold"].iloc[0])
    timings["thresholds"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    roles = dict(zip(inp.sites["site_id"], inp.sites["role"], strict=True))
    unlabelled = [s for s in inp.sites["site_id"] if roles[s] == "unlabelled" and s not in inp.refs]
    single = [s for s in inp.sites["site_id"] if roles[s] == "single" and s not in inp.refs]
    ckpt = version_dir / ds["model"].uri / CHECKPOINT
    to_predict = [(s, "unlabelled") for s in unlabelled]
    rows: list[dict] = []
    copied = 0
    for s in single:
        if params.second_opinion == "oos" and (oos_dir / f"{s}.tif").exists():
            shutil.copyfile(oos_dir / f"{s}.tif", out_dir / f"{s}.tif")
            rows += site_polygons(
                s, inp.grids[s], read_prob_raster(out_dir / f"{s}.tif"), params, "single_second_opinion"
            )
            copied += 1
        else:
            to_predict.append((s, "single_second_opinion"))
    no_imagery, empty, predicted = [], [], 0
    if to_predict and not ckpt.exists():
        notes.append(f"no trained model in this version: {len(to_predict)} site(s) get no pseudo-labels")
        to_predict = []
    if to_predict:
        model, card = (model_loader or load_checkpoint)(ckpt, device)
        mean = np.asarray(card["normalisation"]["mean"], np.float32)
        std = np.asarray(card["normalisation"]["std"], np.float32)
        for i in range(0, len(to_predict), CHUNK):
            chunk = []
            for s, src in to_predict[i : i + CHUNK]:
                px = inp.pixels(s, mean, std)
                if px is None:
                    no_imagery.append(s)
                else:
                    chunk.append((s, src, px))
            probs = predict_sites(model, [c[2].x for c in chunk], [c[2].valid for c in chunk], params, device)
            for (s, src, px), prob in zip(chunk, probs, strict=True):
                write_prob_raster(out_dir / f"{s}.tif", inp.grids[s], prob)
                if not px.valid.any():
                    empty.append(s)
                rows += site_polygons(s, inp.grids[s], prob, params, src)
                predicted += 1
    if no_imagery:
        notes.append(f"sites without imagery (no pseudo-labels): {', '.join(no_imagery)}")
    if empty:
        notes.append(
            f"sites that are all nodata or cloud (probabilities NaN, no polygon): {', '.join(empty)}"
        )
    timings["predict_and_vectorise"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    labels = pd.DataFrame(rows, columns=[c for c in POLYGON_COLUMNS if c != "kept"])
    labels["confidence"] = labels["confidence"].astype(float)  # typed even without rows
    labels["kept"] = labels["confidence"].to_numpy() >= threshold
    labels = labels[POLYGON_COLUMNS]
    artifacts = {
        "pseudo_probabilities": folder_artifact(out_dir, ds["pseudo_probabilities"].uri),
        "pseudo_labels": write_table("pseudo_labels", labels, version_dir / ds["pseudo_labels"].uri),
        "pseudo_label_thresholds": write_table(
            "pseudo_label_thresholds", thresholds, version_dir / ds["pseudo_label_thresholds"].uri
        ),
    }
    timings["write"] = time.perf_counter() - t2
    counts = {
        "pseudo_sites": predicted + copied,
        "pseudo_polygons": len(labels),
        "pseudo_polygons_kept": int(labels["kept"].sum()),
    }
    return LearnStageResult(
        artifacts, timings, counts, notes, {"device": device.type, "torch_threads": threads}
    )
