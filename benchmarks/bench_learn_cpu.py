"""Learn stages on this machine's CPU: inference tiles/s, training steps/s, and their share of a demo run.

    .venv/bin/python benchmarks/bench_learn_cpu.py [--sites-per-side 8] [--threads 1] [--manifest PATH]

1. Inference: fp32 eager forward + softmax (``model.predict``) of 4x224x224 tiles, the default CPU network
   (``LearnParams``: base width 8, depth 3) and the brief's base-16 variant, at 1 thread and every core.
2. Training: optimiser steps/s at the default batch (4 random 96-px crops).
3. A demo region (``sites_per_side`` 8 = 128 sites) through ingest, consensus, train and pseudo_labels in
   this process (no Prefect/Dask overhead), with torch on ``--threads`` (1 = what a one-thread Dask CPU
   worker gives the stage): wall and CPU seconds per stage, the learn share, and the pseudo-labels
   measured against the region's true fields. ``--manifest`` also prints a published refresh's timings.

Wall times on a shared machine vary with its load; CPU seconds are the steadier figure, so both print.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from schemas.catalog import load_catalog
from tasks.consensus.run import run_consensus_stage
from tasks.demo import generate_demo_region
from tasks.ingest.stage import run_ingest
from tasks.learn.evaluate import evaluate_against_truth, load_truth
from tasks.learn.model import ModelConfig, UNet, n_parameters, predict, seed_everything, train
from tasks.learn.params import LearnParams
from tasks.learn.run import run_pseudo_label_stage, run_train_stage

REPO = Path(__file__).resolve().parents[1]


def clock(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def inference(threads: int, base: int, n: int = 16) -> float:
    torch.set_num_threads(threads)
    seed_everything(0)
    model = UNet(ModelConfig(base_width=base))
    tiles = np.random.default_rng(0).normal(size=(n, 4, 224, 224)).astype(np.float32)
    predict(model, tiles[:8], batch_size=8)  # warm-up
    _, wall, _ = clock(lambda: predict(model, tiles, batch_size=8))
    return n / wall


def training(threads: int, p: LearnParams, steps: int = 30) -> float:
    torch.set_num_threads(threads)
    seed_everything(0)
    model = UNet(ModelConfig(base_width=p.base_width, depth=p.depth))
    rng = np.random.default_rng(0)
    b, c = p.batch_size, p.crop_px
    batch = (
        rng.normal(size=(b, 4, c, c)).astype(np.float32),
        rng.integers(0, 3, (b, c, c)),
        np.ones((b, c, c), np.float32),
    )
    train(model, iter(lambda: batch, None), 3)
    _, wall, _ = clock(lambda: train(model, iter(lambda: batch, None), steps, class_weights=p.class_weights))
    return steps / wall


def demo_run(root: Path, sites_per_side: int, threads: int) -> None:
    generate_demo_region(root, scale=1, seed=0, sites_per_side=sites_per_side)
    raw = yaml.safe_load((REPO / "data_catalog.yaml").read_text(encoding="utf-8"))
    raw["root"] = "."
    raw["settings"]["learn"] = {"torch_threads": threads}
    (root / "data_catalog.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    catalog = load_catalog(root / "data_catalog.yaml")
    vdir = root / "versions" / "bench"
    vdir.mkdir(parents=True)
    stages = {}
    for name, fn in (
        ("ingest", run_ingest),
        ("consensus", run_consensus_stage),
        ("train", run_train_stage),
        ("pseudo_labels", run_pseudo_label_stage),
    ):
        res, wall, cpu = clock(lambda fn=fn: fn(catalog, vdir))
        stages[name] = (wall, cpu, res)
        print(f"  {name:14s} wall {wall:6.1f} s   cpu {cpu:6.1f} s   {getattr(res, 'counts', {})}")
    total = sum(s[0] for s in stages.values())
    learn = stages["train"][0] + stages["pseudo_labels"][0]
    print(f"  learn share of the four stages' wall time: {learn:.1f} / {total:.1f} s = {learn / total:.0%}")
    print(f"  train timings: { {k: round(v, 1) for k, v in stages['train'][2].timings.items()} }")
    print(f"  pseudo timings: { {k: round(v, 1) for k, v in stages['pseudo_labels'][2].timings.items()} }")
    card = json.loads((vdir / "model" / "model_card.json").read_text())
    oos = {k: round(v, 3) for k, v in card["metrics"]["out_of_sample_pixel"].items()}
    print(f"  out-of-sample pixel IoU vs training targets: {oos}")
    thr = __import__("pandas").read_parquet(vdir / "pseudo_label_thresholds.parquet").iloc[0].to_dict()
    print(f"  threshold: { {k: (round(v, 3) if isinstance(v, float) else v) for k, v in thr.items()} }")
    truth = load_truth(root)
    for source in ("unlabelled", "single_second_opinion"):
        ev = evaluate_against_truth(vdir, truth, source)
        print(f"  vs true fields, {source}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in ev.items()))
    notes = [n for s in stages.values() for n in getattr(s[2], "notes", [])]
    if notes:
        print("  notes: " + " | ".join(notes))


def _fmt(v):
    return f"{v:.3f}" if isinstance(v, float) else v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sites-per-side", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the demo run")
    ap.add_argument(
        "--root", type=Path, default=None, help="Folder for the demo region (default: a temp dir)"
    )
    ap.add_argument("--manifest", type=Path, default=None, help="A published manifest.json to summarise")
    ap.add_argument("--skip-demo", action="store_true")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    print(f"torch {torch.__version__}, {cores} cores, load average {os.getloadavg()[0]:.2f}")
    p = LearnParams()
    for base in (p.base_width, 16):
        n = n_parameters(UNet(ModelConfig(base_width=base)))
        rates = ", ".join(f"{t} thread(s) {inference(t, base):.1f}" for t in sorted({1, cores}))
        print(f"inference fp32 eager 4x224x224, base {base} ({n / 1e6:.2f} M params): tiles/s {rates}")
    rates = ", ".join(f"{t} thread(s) {training(t, p):.1f}" for t in sorted({1, cores}))
    print(f"training, batch {p.batch_size} x 4x{p.crop_px}^2, base {p.base_width}: steps/s {rates}")
    if not args.skip_demo:
        print(f"demo region, sites_per_side={args.sites_per_side}, torch threads {args.threads}:")
        if args.root:
            demo_run(args.root, args.sites_per_side, args.threads)
        else:
            with tempfile.TemporaryDirectory(prefix="bench-learn-") as tmp:
                demo_run(Path(tmp), args.sites_per_side, args.threads)
    if args.manifest:
        m = json.loads(args.manifest.read_text())
        print(f"manifest {args.manifest}: flow {m.get('flow_seconds_before_publish', float('nan')):.1f} s")
        for stage, t in m.get("stage_seconds", {}).items():
            print(f"  {stage:14s} {t:6.1f} s")


if __name__ == "__main__":
    main()
