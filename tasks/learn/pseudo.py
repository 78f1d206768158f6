"""The ``pseudo_labels`` stage: thresholds from out-of-sample polygons, then pseudo-labels to publish.

1. On gold and multi-labeller sites, vectorise the out-of-sample probabilities and the targets with the
   same rule, match polygons (true positive at IoU >= ``match_iou``) and choose, per class, the lowest
   confidence threshold that reaches ``target_precision``. These sites were never seen by the model that
   predicted them, so the measured precision is an honest estimate for unseen sites.
2. Predict unlabelled sites with the final model; single-labeller sites get a second opinion (by default
   their out-of-sample probabilities, which never saw that labeller's polygons on that site).
3. Vectorise every prediction; a polygon is ``kept`` when its confidence reaches its class threshold.

The per-site work of 1-3 (evidence, prediction, vectorisation) runs a chunk of sites per Dask task, all in
one computation (``tasks.learn.pseudo_sites``); this module decides what to do and writes the tables.

Incremental reprocessing: the thresholds are keyed by (the model's key, parameters, code). With
``reuse.refit`` False (the model was kept) and the same key, the previous version's thresholds are
carried whatever ``reuse.enabled`` says: they were calibrated for that model; otherwise they are reused
when the key is unchanged and recomputed when not. Each pseudo-labelled site is a unit keyed by what its
probabilities come from: (the model's key, the site's tile key, its source, parameters, device, code), or
for a single-labeller second opinion copied from the out-of-sample raster, that raster's key. A unit whose
key is unchanged takes the previous version's raster (linked) and polygons; ``kept`` is re-applied to every
polygon from the thresholds in use.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from schemas.catalog import Catalog
from tasks.learn.model import load_checkpoint
from tasks.learn.params import LearnParams, params_from_catalog
from tasks.learn.pseudo_parts import ROW_COLUMNS, write_pseudo_labels
from tasks.learn.pseudo_sites import FIELD, SiteWork, fan_out
from tasks.learn.run import (
    CARD,
    CHECKPOINT,
    MODEL_UNIT,
    TRAIN_CODE,
    Inputs,
    LearnStageResult,
    environment,
    folder_artifact,
    load_inputs,
)
from tasks.learn.train import configure_threads, device_for
from tasks.learn.vectorise import choose_threshold, precision_at
from tasks.store.artifacts import file_hash, read_table, write_table
from tasks.store.reuse import (
    Reuse,
    code_key,
    content_key,
    link_or_copy,
    read_keys,
    reuse_counts,
    write_keys,
)

STAGE = "pseudo_labels"
THRESHOLDS_UNIT = "__thresholds__"  # the thresholds' key in reuse_keys/pseudo_labels
PSEUDO_CODE = (
    *TRAIN_CODE,
    "tasks.learn.pseudo",
    "tasks.learn.pseudo_parts",
    "tasks.learn.pseudo_sites",
    "tasks.learn.vectorise",
)


def threshold_sites(inp: Inputs, oos_dir: Path, params: LearnParams) -> list[str]:
    """The labelled sites whose out-of-sample polygons set the thresholds (``threshold_roles``), in order."""
    return [
        s for s in inp.labelled if inp.role(s) in params.threshold_roles and (oos_dir / f"{s}.tif").exists()
    ]


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


def previous_thresholds(reuse: Reuse, uri: str, key: str) -> pd.DataFrame | None:
    """The previous version's thresholds when they were computed under ``key`` (None otherwise)."""
    prev = reuse.previous_keys(STAGE).get(THRESHOLDS_UNIT)
    if prev is None or prev[0] != key or reuse.previous is None or not (reuse.previous / uri).exists():
        return None
    return read_table(reuse.previous / uri)


def pseudo_label_stage(
    catalog: Catalog, version_dir: Path, model_loader=None, reuse: Reuse | None = None
) -> LearnStageResult:
    reuse = reuse or Reuse()
    ds = catalog.datasets
    device, params = device_for(params_from_catalog(catalog))
    threads = configure_threads(params)
    env = environment(device, threads)
    code = code_key(*PSEUDO_CODE)
    pdump = params.model_dump(mode="json")
    timings: dict[str, float] = {}
    notes: list[str] = []
    t0 = time.perf_counter()
    inp = load_inputs(catalog, version_dir)
    oos_dir = version_dir / ds["oos_probabilities"].uri
    out_dir = version_dir / ds["pseudo_probabilities"].uri
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = version_dir / ds["model"].uri / CHECKPOINT
    train_keys = read_keys(version_dir, "train")
    model_key = None
    if ckpt.exists():
        model_key = train_keys[MODEL_UNIT][0] if MODEL_UNIT in train_keys else file_hash(ckpt)

    # ------------------------------------------------------------------------------------ thresholds
    thr_key = content_key("thresholds", model_key, pdump, list(catalog.settings.reference_labellers), code)
    thr_uri = ds["pseudo_label_thresholds"].uri
    carried = previous_thresholds(reuse, thr_uri, thr_key) if (reuse.enabled or not reuse.refit) else None
    work = SiteWork()
    if carried is not None:
        notes.append(
            "thresholds carried from the previous version: calibrated for the same model"
            + (" (kept, refit=False)" if not reuse.refit else ", parameters and code")
        )
    else:
        work.evidence_sites = threshold_sites(inp, oos_dir, params)
    thr_notes_at = len(notes)  # the thresholds' notes go here once they are chosen (after the fan-out)

    # --------------------------------------------------------------------------------- units, keys
    roles = dict(zip(inp.sites["site_id"], inp.sites["role"], strict=True))
    unlabelled = [s for s in inp.sites["site_id"] if roles[s] == "unlabelled" and s not in inp.ref_sites]
    single = [s for s in inp.sites["site_id"] if roles[s] == "single" and s not in inp.ref_sites]
    units: dict[str, tuple[str, str]] = {}  # site -> (polygon source, "oos" | "final")
    for s in unlabelled:
        units[s] = ("unlabelled", "final")
    for s in single:
        oos = params.second_opinion == "oos" and (oos_dir / f"{s}.tif").exists()
        units[s] = ("single_second_opinion", "oos" if oos else "final")
    finals = [s for s, (_, how) in units.items() if how == "final"]
    if finals and model_key is None:
        notes.append(f"no trained model in this version: {len(finals)} site(s) get no pseudo-labels")
        units = {s: u for s, u in units.items() if u[1] == "oos"}
    no_imagery = sorted(s for s, (_, how) in units.items() if how == "final" and inp.scene_path(s) is None)
    units = {s: u for s, u in units.items() if s not in no_imagery}
    keys = {}
    for s, (src, how) in units.items():
        if how == "oos":
            rec = train_keys.get(s)
            oos = rec[0] if rec is not None else file_hash(oos_dir / f"{s}.tif")
            keys[s] = content_key("pseudo", "oos", src, oos, pdump, code)
        else:
            keys[s] = content_key("pseudo", "final", src, model_key, inp.tile_key(s), pdump, env, code)

    # ------------------------------------------------------------------------------- reuse, copy
    prev_out = reuse.previous / ds["pseudo_probabilities"].uri if reuse.previous else None
    reused = {
        s for s in reuse.reusable(STAGE, keys) if prev_out is not None and (prev_out / f"{s}.tif").exists()
    }
    for s in sorted(reused):
        link_or_copy(prev_out / f"{s}.tif", out_dir / f"{s}.tif")
    work.copied = [s for s, (_, how) in units.items() if how == "oos" and s not in reused]
    for s in work.copied:
        link_or_copy(oos_dir / f"{s}.tif", out_dir / f"{s}.tif")
    work.predict = [s for s, (_, how) in units.items() if how == "final" and s not in reused]
    mean = std = None
    if work.predict:
        # the model's own normalisation (a kept model keeps the statistics it was trained with)
        card = json.loads((ckpt.parent / CARD).read_text(encoding="utf-8"))
        mean = np.asarray(card["normalisation"]["mean"], np.float32)
        std = np.asarray(card["normalisation"]["std"], np.float32)
    timings["load"] = time.perf_counter() - t0

    # ------------------------------------- threshold evidence, prediction, vectorisation: chunk tasks
    t1 = time.perf_counter()
    sources = {s: units[s][0] for s in work.copied + work.predict}
    loader = model_loader or load_checkpoint
    fan_out(work, inp, sources, oos_dir, out_dir, ckpt, mean, std, params, device.type, loader)
    if no_imagery:
        notes.append(f"sites without imagery (no pseudo-labels): {', '.join(no_imagery)}")
    if work.empty:
        notes.append(
            f"sites that are all nodata or cloud (probabilities NaN, no polygon): {', '.join(work.empty)}"
        )
    other = sorted(work.threads - {threads})
    if other:
        notes.append(f"some sites predicted with {other} torch thread(s), the stage with {threads}")
    timings["sites"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    if carried is not None:
        thresholds = carried
    else:
        evidence = pd.DataFrame(work.evidence, columns=["site_id", "role", "class", "confidence", "tp"])
        thresholds, thr_notes = choose_thresholds(evidence, work.n_targets, params)
        notes[thr_notes_at:thr_notes_at] = thr_notes
    threshold = float(thresholds["threshold"].iloc[0])
    timings["thresholds"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    # parts of sites: those of unchanged units (and threshold) are the previous version's files, linked
    fresh = pd.DataFrame(work.rows, columns=ROW_COLUMNS)
    crs = {s: inp.grids[s].crs for s in units}
    labels = write_pseudo_labels(
        version_dir / ds["pseudo_labels"].uri,
        keys,
        crs,
        fresh,
        reused,
        threshold,
        reuse,
        ds["pseudo_labels"].uri,
    )
    thr_reused = {THRESHOLDS_UNIT} if carried is not None else set()
    artifacts = {
        "pseudo_probabilities": folder_artifact(
            out_dir, ds["pseudo_probabilities"].uri, reuse=reuse, name="pseudo_probabilities"
        ),
        "pseudo_labels": labels.record,
        "pseudo_label_thresholds": write_table("pseudo_label_thresholds", thresholds, version_dir / thr_uri),
        f"reuse_keys/{STAGE}": write_keys(
            version_dir, STAGE, {**keys, THRESHOLDS_UNIT: thr_key}, reused | thr_reused, reuse
        ),
    }
    timings["write"] = time.perf_counter() - t3
    counts = {
        "pseudo_sites": len(units),
        "pseudo_polygons": labels.rows,
        "pseudo_polygons_kept": labels.kept,
        "pseudo_thresholds_computed": int(carried is None),
        **reuse_counts(STAGE, len(units), len(reused)),
    }
    return LearnStageResult(
        artifacts, timings, counts, notes, {"device": device.type, "torch_threads": threads}
    )
