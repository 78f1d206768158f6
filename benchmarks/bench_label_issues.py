"""Benchmark: our confident-learning label issues vs cleanlab on real CIFAR-10 test labels.

Run: ``.venv/bin/python benchmarks/bench_label_issues.py``. Needs the ``bench`` extra (cleanlab).
Ground truth: the 275 mturk-checked images, 54 of them verified errors (``mturk.given < 3``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from cleanlab.filter import find_label_issues as cl_find_label_issues
from cleanlab.rank import get_label_quality_scores

from tasks.learn.item_issues import auroc, find_label_issues

ERRORS = Path(__file__).resolve().parents[1].parent / "shared/data/real/label_errors"
REPEATS = 5


def best_time(fn) -> tuple[object, float]:
    out, best = None, np.inf
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def main() -> None:
    p = np.load(ERRORS / "cifar10_test_pred_probs.npy")
    labels = np.load(ERRORS / "cifar10_test_given_labels.npy").astype(np.int64)
    checked = json.loads((ERRORS / "cifar10_mturk.json").read_text())
    ids = np.array([c["id"] for c in checked])
    verified = np.array([c["mturk"]["given"] < 3 for c in checked])
    is_error = np.zeros(len(labels), bool)
    is_error[ids[verified]] = True
    print(f"CIFAR-10 test: {len(labels)} images, {len(ids)} mturk-checked, {verified.sum()} verified errors")
    rows = []
    for filter_by in ("prune_by_noise_rate", "prune_by_class", "both"):
        for rank_by in ("self_confidence", "normalized_margin"):
            ours, t_ours = best_time(
                lambda f=filter_by, r=rank_by: find_label_issues(labels, p, filter_by=f, rank_by=r)
            )
            theirs, t_cl = best_time(
                lambda f=filter_by: cl_find_label_issues(labels, p, filter_by=f, n_jobs=1)
            )
            mask = ours["is_issue"].to_numpy()
            quality = get_label_quality_scores(labels, p, method=rank_by)
            rows.append(
                (filter_by, rank_by, mask, ours["score"].to_numpy(), t_ours, theirs, 1 - quality, t_cl)
            )
    cols = ("filter_by", "rank_by", "who", "flagged", "recall54", "AUROC10k", "AUROC275", "ms")
    print("{:<20} {:<18} {:<9} {:>7} {:>9} {:>9} {:>9} {:>8}".format(*cols))
    for filter_by, rank_by, mask, score, t_ours, cl_mask, cl_score, t_cl in rows:
        for who, m, s, t in (("ours", mask, score, t_ours), ("cleanlab", cl_mask, cl_score, t_cl)):
            print(
                f"{filter_by:<20} {rank_by:<18} {who:<9} {m.sum():>7d} {m[is_error].sum():>5d}/54 "
                f"{auroc(s, is_error):>9.4f} {auroc(s[ids], verified):>9.4f} {t * 1000:>8.1f}"
            )
        print(
            f"{'':<39} same mask as cleanlab: {bool((mask == cl_mask).all())}; speed-up x{t_cl / t_ours:.1f}"
        )
    _, t_default = best_time(lambda: cl_find_label_issues(labels, p))
    print(f"cleanlab default n_jobs (multiprocessing) prune_by_noise_rate: {t_default * 1000:.1f} ms")
    print(
        f"AUROC of 1 - p(given) among the 275 checked: {auroc(1 - p[ids, labels[ids]], verified):.4f}; "
        f"over all 10,000: {auroc(1 - p[np.arange(len(labels)), labels], is_error):.4f}"
    )


if __name__ == "__main__":
    main()
