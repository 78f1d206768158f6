"""Benchmark: our item consensus vs Crowd-Kit on the real Dog and Face crowd sets (accuracy, wall time).

Run: ``.venv/bin/python benchmarks/bench_item_consensus.py``. Needs the ``bench`` extra (crowd-kit).
Times are the best of ``REPEATS`` runs in one process, so both libraries are measured warm.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from crowdkit.aggregation import DawidSkene, MajorityVote

from tasks.consensus.items import item_consensus

REAL = Path(__file__).resolve().parents[1].parent / "shared/data/real"
SETS = ("s4_Dog_data", "s4_Face_Sentiment_Identification")
REPEATS = 5
GOLD_SEEDS = 10


def load(name: str) -> tuple[pd.DataFrame, pd.Series]:
    answers = pd.read_csv(REAL / "crowd" / name / "answer.csv", dtype=str)
    answers = answers.rename(columns={"question": "item_id", "worker": "labeller_id", "answer": "label"})
    truth = pd.read_csv(REAL / "crowd" / name / "truth.csv", dtype=str).set_index("question")["truth"]
    return answers, truth


def best_time(fn) -> tuple[object, float]:
    out, best = None, np.inf
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def acc(pred: pd.Series, truth: pd.Series) -> float:
    return float((pred.reindex(truth.index) == truth).mean())


def main() -> None:
    warnings.filterwarnings("ignore")
    for name in SETS:
        answers, truth = load(name)
        ck_data = answers.rename(columns={"item_id": "task", "labeller_id": "worker"})
        runs = {
            "ours ds": lambda a=answers: item_consensus(a, method="ds").items.set_index("item_id")["label"],
            "ours mv": lambda a=answers: item_consensus(a, method="mv").items.set_index("item_id")["label"],
            "crowdkit DawidSkene": lambda d=ck_data: DawidSkene(n_iter=100).fit_predict(d),
            "crowdkit MajorityVote": lambda d=ck_data: MajorityVote().fit_predict(d),
        }
        res = {k: best_time(fn) for k, fn in runs.items()}
        print(
            f"\n{name}: {answers['item_id'].nunique()} items, {answers['labeller_id'].nunique()} labellers, "
            f"{len(answers)} labels"
        )
        for k, (pred, t) in res.items():
            print(f"  {k:<22} accuracy {acc(pred, truth):.4f}   time {t * 1000:8.1f} ms")
        for ours, theirs in (("ours ds", "crowdkit DawidSkene"), ("ours mv", "crowdkit MajorityVote")):
            a_ratio = acc(res[ours][0], truth) / acc(res[theirs][0], truth)
            t_ratio = res[theirs][1] / res[ours][1]
            print(f"  {ours} / {theirs}: accuracy ratio {a_ratio:.4f}, speed-up x{t_ratio:.1f}")
        # gold clamping: 10% of truth as gold, accuracy on the other 90%, averaged over seeds
        rows = []
        plain = res["ours ds"][0]
        ck_plain = res["crowdkit DawidSkene"][0]
        for seed in range(GOLD_SEEDS):
            gold = truth.sample(frac=0.1, random_state=seed)
            rest = truth[truth.index.difference(gold.index)]
            ours = item_consensus(answers, pd.DataFrame({"item_id": gold.index, "label": gold.values}))
            ck = DawidSkene(n_iter=100).fit(ck_data, true_labels=gold).labels_
            rows.append(
                (
                    acc(plain, rest),
                    acc(ours.items.set_index("item_id")["label"], rest),
                    acc(ck_plain, rest),
                    acc(ck, rest),
                )
            )
        r = np.array(rows)
        gain_ours, gain_ck = r[:, 1] - r[:, 0], r[:, 3] - r[:, 2]
        print(f"  10% gold, accuracy on the other 90% (mean of {GOLD_SEEDS} draws):")
        print(
            f"    ours     {r[:, 0].mean():.4f} -> {r[:, 1].mean():.4f} (worst draw {gain_ours.min():+.4f})"
        )
        print(f"    crowdkit {r[:, 2].mean():.4f} -> {r[:, 3].mean():.4f} (worst draw {gain_ck.min():+.4f})")


if __name__ == "__main__":
    main()
