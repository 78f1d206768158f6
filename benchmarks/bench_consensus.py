"""Throughput, quality and memory of the pooled pattern-count EM vs crowd-kit, on the same masks.

    .venv/bin/python benchmarks/bench_consensus.py [--sites 200] [--size 224] [--per-site 4] [--seed 0]

Masks come from ``tasks.consensus.synthetic.synthetic_region`` (rectangular fields, labellers with known
misses / false fields / edge jitter), rasterised once outside the timed region. Timed, in one process:

* ours: vote-pattern counts per site (edge zone + unique patterns), one pooled EM fit, per-site posterior
  lookup -> label maps (exactly the path of ``pattern_counts_batch`` / ``fit_pooled_em`` /
  ``consensus_batch`` minus rasterisation);
* crowd-kit ``SegmentationEM`` and ``SegmentationMajorityVote`` on the same masks;
* the whole polygon stage (``run_consensus_local``: rasterise, Lacuna + sound measures, EM, rasters,
  vectorised polygons) for context.

Throughput is labeller-pixels per second (sum over sites of n_labellers * height * width / seconds).
IoU is pooled over non-gold sites against the hidden truth. Peak memory: tracemalloc peak of a separate
(untimed) run of each method, plus the process RSS at the end (psutil).
"""

from __future__ import annotations

import argparse
import gc
import time
import tracemalloc
import warnings

import numpy as np
import pandas as pd
import psutil

from tasks.consensus.em import fit_em
from tasks.consensus.params import ConsensusParams
from tasks.consensus.patterns import counts_frame, edge_zone, site_patterns
from tasks.consensus.rasterise import labeller_mask, rasterise_classes
from tasks.consensus.stage import run_consensus_local, site_inputs
from tasks.consensus.synthetic import LabellerSpec, synthetic_region

SPECS = {
    "a": LabellerSpec(0.05, 0.1, 1.5, 0.05),
    "b": LabellerSpec(0.1, 0.2, 2.5, 0.1),
    "c": LabellerSpec(0.2, 0.4, 4.0, 0.15),
    "d": LabellerSpec(0.3, 0.7, 6.0, 0.2),
    "e": LabellerSpec(0.45, 1.2, 8.0, 0.3),
    "f": LabellerSpec(0.15, 0.3, 3.0, 0.1),
}


def ours(masks: list[tuple[str, tuple[str, ...], np.ndarray, np.ndarray | None]], params: ConsensusParams):
    """Mask-level pooled EM: counts -> one fit -> lookup. Mirrors the stage minus rasterisation: the counts
    pass keeps only the (tiny) counts, the consensus pass recomputes each site's patterns, as the batch
    functions do on separate workers."""
    n_obs = params.n_classes + 2

    def patterns(voters, m, gold, inverse):
        z = edge_zone(m > 0, params.edge_zone_px).reshape(-1)
        return site_patterns(m.reshape(len(voters), -1), gold, n_obs, z, with_inverse=inverse)

    model = fit_em(counts_frame([(v, patterns(v, m, g, False)) for _, v, m, g in masks]), None, params)
    out = {}
    for sid, voters, m, gold in masks:
        pats = patterns(voters, m, gold, True)
        p = model.field_posterior(voters, pats.votes, pats.zone)
        if gold is not None:  # gold output is the reference (clamp_gold_output)
            p = np.where(pats.gold >= 0, (pats.gold > 0).astype(float), p)
        out[sid] = (p >= params.label_threshold)[pats.inverse].reshape(m.shape[1:])
    return out


def crowdkit(masks, which: str):
    from crowdkit.aggregation import SegmentationEM, SegmentationMajorityVote

    rows = [
        (sid, v, (m[i] > 0).astype(np.int64)) for sid, voters, m, _ in masks for i, v in enumerate(voters)
    ]
    df = pd.DataFrame(rows, columns=["task", "worker", "segmentation"])
    agg = SegmentationEM() if which == "em" else SegmentationMajorityVote()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = agg.fit_predict(df)
    return {sid: np.asarray(res[sid]).astype(bool) for sid, *_ in masks}


def pooled_iou(pred: dict, truth: dict, skip: set) -> float:
    i = u = 0
    for sid, t in truth.items():
        if sid in skip:
            continue
        i += int((pred[sid] & t).sum())
        u += int((pred[sid] | t).sum())
    return i / u if u else 1.0


def timed(fn, *args):
    gc.collect()
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def peak_mib(fn, *args) -> float:
    gc.collect()
    tracemalloc.start()
    fn(*args)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sites", type=int, default=200)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--per-site", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    params = ConsensusParams()

    t0 = time.perf_counter()
    reg = synthetic_region(
        SPECS,
        n_sites=args.sites,
        size_px=args.size,
        per_site=args.per_site,
        gold_every=5,
        max_fields=8,
        seed=args.seed,
    )
    sites = list(site_inputs(reg.sites, reg.labels, reg.assignments, ["expert"]))
    masks, truth, gold_sites = [], {}, set()
    for s in sites:
        m = np.stack([labeller_mask(s, v, params) for v in s.voters])
        gold = labeller_mask(s, s.reference_id, params).reshape(-1) if s.is_gold else None
        masks.append((s.site_id, s.voters, m, gold))
        truth[s.site_id] = rasterise_classes(s.grid, [(g, 1) for g, _ in reg.truth[s.site_id]]) > 0
        if s.is_gold:
            gold_sites.add(s.site_id)
    lab_px = sum(m.size for _, _, m, _ in masks)
    print(
        f"setup: {len(masks)} sites of {args.size}x{args.size} px, {args.per_site} labellers/site "
        f"({lab_px / 1e6:.1f} M labeller-pixels), {len(gold_sites)} gold; "
        f"built in {time.perf_counter() - t0:.1f} s"
    )

    # crowd-kit does not use gold; ours gets gold only through clamping, and IoU is scored off gold sites.
    results, preds = {}, {}
    for name, fn, fargs in [
        ("ours_em", ours, (masks, params)),
        ("crowdkit_em", crowdkit, (masks, "em")),
        ("crowdkit_mv", crowdkit, (masks, "mv")),
    ]:
        pred, secs = timed(fn, *fargs)
        preds[name] = pred
        results[name] = {
            "seconds": secs,
            "labeller_px_per_s": lab_px / secs,
            "iou_vs_truth": pooled_iou(pred, truth, gold_sites),
            "peak_mib": peak_mib(fn, *fargs),
        }
    no_gold = [(sid, v, m, None) for sid, v, m, _ in masks]
    pred, secs = timed(ours, no_gold, params)
    results["ours_em_no_gold"] = {
        "seconds": secs,
        "labeller_px_per_s": lab_px / secs,
        "iou_vs_truth": pooled_iou(pred, truth, gold_sites),
        "peak_mib": float("nan"),
    }
    for v in sorted(SPECS):
        on = {sid for sid, voters, _, _ in masks if v in voters and sid not in gold_sites}
        lab = {sid: m[list(voters).index(v)] > 0 for sid, voters, m, _ in masks if sid in on}
        sub = {sid: truth[sid] for sid in on}
        results[f"labeller_{v}"] = {"iou_vs_truth": pooled_iou(lab, sub, set())}
        results[f"ours_on_{v}_sites"] = {
            "iou_vs_truth": pooled_iou({k: preds["ours_em"][k] for k in on}, sub, set()),
        }

    table = pd.DataFrame(results).T
    pd.set_option("display.width", 140)
    print(table.to_string(float_format=lambda x: f"{x:,.4g}"))
    ck = results["crowdkit_em"]
    me = results["ours_em"]
    print(
        "\nours vs crowdkit SegmentationEM: "
        f"{me['labeller_px_per_s'] / ck['labeller_px_per_s']:.1f}x throughput, "
        f"IoU {me['iou_vs_truth']:.4f} vs {ck['iou_vs_truth']:.4f}; "
        f"vs SegmentationMajorityVote: "
        f"{me['labeller_px_per_s'] / results['crowdkit_mv']['labeller_px_per_s']:.1f}x, "
        f"IoU {results['crowdkit_mv']['iou_vs_truth']:.4f}"
    )

    full, secs = timed(run_consensus_local, None, None, None, ["expert"], params, 100, sites)
    print(
        f"full polygon stage (run_consensus_local, {len(sites)} sites): {secs:.2f} s = "
        f"{lab_px / secs / 1e6:.2f} M labeller-px/s; EM {full.em_model.n_iter} iterations, "
        f"{len(full.pattern_counts)} pattern rows"
    )
    print(f"process RSS at end: {psutil.Process().memory_info().rss / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
