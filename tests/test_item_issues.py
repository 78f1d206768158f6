"""Image-level label issues: confident joint by definition, the real CIFAR-10 bar, errors, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from flows.standalone import find_label_issues as find_cmd
from flows.standalone import item_consensus as consensus_cmd
from tasks.learn.item_issues import (
    auroc,
    confident_joint,
    confident_thresholds,
    find_label_issues,
    run_find_label_issues,
    validate,
)
from tasks.store.errors import InputError

REAL = Path(__file__).resolve().parents[1].parent / "shared/data/real"
ERRORS = REAL / "label_errors"


def noisy_toy(n: int = 300, K: int = 3, n_flip: int = 12, seed: int = 0):
    """Predictions of varied confidence in the true class; ``n_flip`` images the model is sure about
    carry a given label flipped to another class."""
    rng = np.random.default_rng(seed)
    truth = np.arange(n) % K
    labels = truth.copy()
    flipped = rng.choice(n, n_flip, replace=False)
    labels[flipped] = (truth[flipped] + 1 + rng.integers(0, K - 1, n_flip)) % K
    top = rng.uniform(0.6, 0.9, n)
    top[flipped] = 0.97
    p = rng.dirichlet(np.ones(K - 1), n) * (1 - top)[:, None]
    p = np.insert(p, 0, 0.0, axis=1)
    p[:, 0] = top
    cols = (np.arange(K)[None, :] + truth[:, None]) % K  # put `top` in the true class
    out = np.empty_like(p)
    np.put_along_axis(out, cols, p, axis=1)
    return labels, out, flipped


def test_confident_joint_matches_its_definition():
    rng = np.random.default_rng(1)
    labels, p, _ = noisy_toy(seed=1)
    p = 0.6 * p + 0.4 * rng.dirichlet(np.ones(3), len(p))  # blur so several classes can pass
    t = confident_thresholds(labels, p)
    expected = np.zeros((3, 3), int)
    for s, row in zip(labels, p, strict=True):
        ok = row >= t - 1e-6
        if ok.sum() == 1:
            expected[s, np.argmax(ok)] += 1
        elif ok.sum() > 1:
            expected[s, np.argmax(row)] += 1
    np.fill_diagonal(expected, np.maximum(expected.diagonal(), 1))
    assert (confident_joint(labels, p, calibrate=False) == expected).all()
    cal = confident_joint(labels, p)
    assert (cal.sum(axis=1) == np.bincount(labels)).all() and cal.sum() == len(labels)


def test_flipped_labels_are_flagged_and_ranked_first():
    labels, p, flipped = noisy_toy()
    res = find_label_issues(labels, p)
    assert set(res.index[res["is_issue"]]) == set(flipped)
    assert set(res.nsmallest(len(flipped), "rank")["index"]) == set(flipped)
    assert (res.loc[res["is_issue"], "predicted_label"] != res.loc[res["is_issue"], "given_label"]).all()
    assert list(res.columns) == [
        "index",
        "given_label",
        "predicted_label",
        "self_confidence",
        "normalized_margin",
        "score",
        "is_issue",
        "rank",
    ]
    assert sorted(res["rank"]) == list(range(1, len(labels) + 1))


def test_filter_options_nest():
    labels, p, _ = noisy_toy(n=600, n_flip=60, seed=3)
    p = 0.5 * p + 0.5 * np.random.default_rng(3).dirichlet(np.ones(3), len(p))
    m = {f: find_label_issues(labels, p, filter_by=f)["is_issue"].to_numpy() for f in ("both", "union")}
    rate = find_label_issues(labels, p)["is_issue"].to_numpy()
    cls = find_label_issues(labels, p, filter_by="prune_by_class")["is_issue"].to_numpy()
    assert (m["both"] == (rate & cls)).all() and (m["union"] == (rate | cls)).all()
    with pytest.raises(ValueError, match="unknown filter_by"):
        find_label_issues(labels, p, filter_by="magic")


def cifar():
    p = np.load(ERRORS / "cifar10_test_pred_probs.npy")
    labels = np.load(ERRORS / "cifar10_test_given_labels.npy")
    checked = json.loads((ERRORS / "cifar10_mturk.json").read_text())
    ids = np.array([c["id"] for c in checked])
    verified = np.array([c["mturk"]["given"] < 3 for c in checked])
    return labels, p, ids, verified


def test_real_cifar10_bar():
    """cleanlab's find_label_issues flags 284 and catches 49 of the 54 verified errors; match or beat it.

    AUROC: over all 10,000 images (54 verified errors vs the rest) it is ~0.99. Among only the 275
    images mturk checked, every score from pred_probs alone sits near 0.59 (all 275 were picked because
    the model disagreed), so the README's "0.99 among the 275" is not reproducible; that one is a floor.
    """
    labels, p, ids, verified = cifar()
    assert verified.sum() == 54 and len(ids) == 275
    res = find_label_issues(labels, p)
    flagged = res["is_issue"].to_numpy()
    assert flagged.sum() <= 284
    assert flagged[ids[verified]].sum() >= 49
    is_error = np.zeros(len(labels), bool)
    is_error[ids[verified]] = True
    assert auroc(res["score"], is_error) >= 0.97
    assert auroc(res["score"].to_numpy()[ids], verified) >= 0.55


def test_auroc_known_values():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auroc([1, 1], [0, 1]) == 0.5


@pytest.mark.parametrize(
    ("labels", "probs", "message"),
    [
        ([0, 1], [0.5, 0.5], r"must be 2-D .* got shape \(2,\)"),
        ([0, 1, 0], [[0.5, 0.5], [0.5, 0.5]], "one entry per pred_probs row"),
        ([0, 1], [[1.0], [1.0]], "at least 2 classes"),
        (
            [0, 1, 0, 1],
            [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.6, 0.5]],
            r"row 3 \(0-based\) sums to 1.100000",
        ),
        ([0, 1, 0], [[0.5, 0.5], [0.5, 0.5], [np.nan, 1.0]], r"row 2 \(0-based\) contains NaN"),
        ([0, 1, 0], [[0.5, 0.5], [1.5, -0.5], [0.5, 0.5]], r"row 1 \(0-based\) has values outside"),
        ([0, 1, 2], [[0.5, 0.5]] * 3, r"labels\[2\] = 2 is outside the class range 0..1"),
        ([0, -1, 1], [[0.5, 0.5]] * 3, r"labels\[1\] = -1 is outside"),
        ([0, 0.5, 1], [[0.5, 0.5]] * 3, r"labels\[1\] = 0.5 is not an integer"),
    ],
)
def test_validation_names_the_row(labels, probs, message):
    with pytest.raises(ValueError, match=message):
        validate(np.asarray(labels), np.asarray(probs))


def test_sum_tolerance_is_1e_3():
    validate(np.array([0, 1]), np.array([[0.5, 0.5005], [0.4995, 0.5]]))
    with pytest.raises(ValueError, match="row 0"):
        validate(np.array([0, 1]), np.array([[0.5, 0.502], [0.5, 0.5]]))


def test_file_front_end_reads_csv_and_parquet(tmp_path, capsys):
    labels, p, flipped = noisy_toy()
    pd.DataFrame({"label": labels}).to_csv(tmp_path / "labels.csv", index=False)
    pd.DataFrame(p, columns=["c0", "c1", "c2"]).to_parquet(tmp_path / "probs.parquet")
    (tmp_path / "bare.csv").write_text("\n".join(map(str, labels)) + "\n")
    np.save(tmp_path / "probs.npy", p)
    out = run_find_label_issues(tmp_path / "labels.csv", tmp_path / "probs.parquet", tmp_path / "o.parquet")
    assert set(pd.read_parquet(tmp_path / "o.parquet").query("is_issue")["index"]) == set(flipped)
    again = run_find_label_issues(tmp_path / "bare.csv", tmp_path / "probs.npy")
    pd.testing.assert_frame_equal(out, again)
    printed = capsys.readouterr().out
    assert "normalized_margin" in printed and len(printed.splitlines()) == 1 + len(flipped)
    (tmp_path / "bad.csv").write_text("label\n0\n1\ncat\n")
    with pytest.raises(InputError, match=r"row 3: label 'cat' is not an integer"):
        run_find_label_issues(tmp_path / "bad.csv", tmp_path / "probs.npy")
    with pytest.raises(InputError, match="unsupported pred_probs file type '.csv'"):
        run_find_label_issues(tmp_path / "labels.csv", tmp_path / "labels.csv")


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command("item-consensus")(consensus_cmd)
    app.command("find-label-issues")(find_cmd)
    return app


def test_cli_find_label_issues(tmp_path):
    labels, p, flipped = noisy_toy()
    np.save(tmp_path / "labels.npy", labels)
    np.save(tmp_path / "probs.npy", p)
    runner = CliRunner()
    args = ["find-label-issues", "--labels", str(tmp_path / "labels.npy"), "--pred-probs"]
    ok = runner.invoke(cli(), [*args, str(tmp_path / "probs.npy"), "--out", str(tmp_path / "o.csv")])
    assert ok.exit_code == 0, ok.output
    assert f"{len(flipped)} of 300 images flagged" in ok.output
    assert pd.read_csv(tmp_path / "o.csv")["is_issue"].sum() == len(flipped)
    p[5] *= 0.9
    np.save(tmp_path / "bad.npy", p)
    bad = runner.invoke(cli(), [*args, str(tmp_path / "bad.npy")])
    assert bad.exit_code == 2
    assert "pred_probs row 5 (0-based) sums to 0.900000" in bad.output


def test_cli_item_consensus(tmp_path):
    rows = "item_id,labeller_id,label\n1,a,cat\n1,b,cat\n2,a,dog\n2,b,dog\n2,c,cat\n"
    (tmp_path / "labels.csv").write_text(rows)
    runner = CliRunner()
    args = ["item-consensus", "--labels", str(tmp_path / "labels.csv"), "--out", str(tmp_path / "o.parquet")]
    ok = runner.invoke(cli(), args)
    assert ok.exit_code == 0, ok.output
    assert "2 items, 3 labellers, 2 classes" in ok.output
    assert list(pd.read_parquet(tmp_path / "o.parquet")["label"]) == ["cat", "dog"]
    bad = runner.invoke(cli(), [*args, "--method", "vote"])
    assert bad.exit_code == 2 and "unknown method 'vote'" in bad.output
    (tmp_path / "dup.csv").write_text(rows + "1,a,dog\n")
    dup = runner.invoke(cli(), ["item-consensus", "--labels", str(tmp_path / "dup.csv"), "--out", "x.csv"])
    assert dup.exit_code == 2 and "row 6: duplicate (item_id, labeller_id)" in dup.output
