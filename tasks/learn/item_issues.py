"""Image-level label issues by confident learning (Northcutt et al., JAIR 2021), in numpy only.

Given labels and out-of-sample predicted probabilities, estimate how many images of given class i truly
belong to class j (the calibrated confident joint), then flag exactly that many per (i, j) cell: the
images whose p[j] − p[i] is largest. Counting first and ranking second is what keeps the flagged set
small without a hand-tuned threshold. Defaults reproduce ``cleanlab.filter.find_label_issues``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from tasks.store.errors import InputError

FILTERS = ("prune_by_noise_rate", "prune_by_class", "both", "union")
RANKINGS = ("self_confidence", "normalized_margin")
SUM_TOL = 1e-3


def validate(labels, pred_probs, tol: float = SUM_TOL) -> tuple[np.ndarray, np.ndarray]:
    """Return (int64 labels, float64 probs) or raise ``ValueError`` naming the first bad row (0-based)."""
    p = np.asarray(pred_probs)
    y = np.asarray(labels)
    if p.ndim != 2:
        raise ValueError(f"pred_probs must be 2-D (n_examples, n_classes); got shape {p.shape}")
    if not (np.issubdtype(p.dtype, np.number) or p.dtype == bool):
        raise ValueError(f"pred_probs must be numeric; got dtype {p.dtype}")
    p = p.astype(np.float64)
    n, K = p.shape
    if K < 2:
        raise ValueError(f"pred_probs needs at least 2 classes (columns); got {K}")
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"labels must be 1-D with one entry per pred_probs row ({n}); got shape {y.shape}")
    if n == 0:
        raise ValueError("no examples: labels and pred_probs are empty")
    bad = ~np.isfinite(p).all(axis=1)
    if bad.any():
        raise ValueError(f"pred_probs row {np.argmax(bad)} (0-based) contains NaN or inf")
    bad = ((p < 0) | (p > 1 + tol)).any(axis=1)
    if bad.any():
        raise ValueError(f"pred_probs row {np.argmax(bad)} (0-based) has values outside [0, 1]")
    sums = p.sum(axis=1)
    bad = np.abs(sums - 1) > tol
    if bad.any():
        r = int(np.argmax(bad))
        raise ValueError(f"pred_probs row {r} (0-based) sums to {sums[r]:.6f}; rows must sum to 1 (±{tol})")
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise ValueError(f"labels must be integer class indices; got dtype {y.dtype}")
    bad = ~np.isfinite(y) | (y != np.round(y)) if np.issubdtype(y.dtype, np.floating) else np.zeros(n, bool)
    if bad.any():
        raise ValueError(f"labels[{np.argmax(bad)}] = {y[np.argmax(bad)]} is not an integer class index")
    y = y.astype(np.int64)
    bad = (y < 0) | (y >= K)
    if bad.any():
        r = int(np.argmax(bad))
        raise ValueError(f"labels[{r}] = {y[r]} is outside the class range 0..{K - 1}")
    return y, p


def confident_thresholds(labels: np.ndarray, pred_probs: np.ndarray) -> np.ndarray:
    """Mean self-confidence per given class; an absent class gets 2 so nothing is counted into it."""
    K = pred_probs.shape[1]
    counts = np.bincount(labels, minlength=K)
    sums = np.bincount(labels, weights=pred_probs[np.arange(len(labels)), labels], minlength=K)
    t = np.divide(sums, counts, out=np.full(K, 2.0), where=counts > 0)
    return np.clip(t, 2e-6, None)


def _round_preserving_row_totals(m: np.ndarray) -> np.ndarray:
    """Round each row to ints keeping its rounded total: fix the entries with the largest residuals."""
    ints = np.round(m)
    diff = (np.round(m.sum(axis=1)) - ints.sum(axis=1)).astype(int)
    sign = np.sign(diff)[:, None]
    order = np.argsort(-(m - ints) * np.where(sign == 0, 1, sign), axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(m.shape[1])[None, :].repeat(len(m), 0), axis=1)
    return (ints + sign * (rank < np.abs(diff)[:, None])).astype(int)


def confident_joint(labels: np.ndarray, pred_probs: np.ndarray, calibrate: bool = True) -> np.ndarray:
    """K×K counts [given, true]: an image counts for true class j when p[j] reaches j's threshold
    (the largest such p when several do). Calibration rescales rows to the given-label counts."""
    n, K = pred_probs.shape
    above = pred_probs >= confident_thresholds(labels, pred_probs) - 1e-6
    n_above = above.sum(axis=1)
    guess = np.where(n_above > 1, pred_probs.argmax(axis=1), above.argmax(axis=1))
    ok = n_above > 0
    cj = np.bincount(labels[ok] * K + guess[ok], minlength=K * K).reshape(K, K)
    np.fill_diagonal(cj, np.maximum(cj.diagonal(), 1))
    if not calibrate:
        return cj
    label_counts = np.bincount(labels, minlength=K)
    cal = cj / np.clip(cj.sum(axis=1, keepdims=True), 1e-100, None) * label_counts[:, None]
    cal = cal / np.clip(cal.sum(), 1e-100, None) * n
    return _round_preserving_row_totals(cal)


def _keep_at_least_n_per_class(prune: np.ndarray, n: int) -> np.ndarray:
    """Raise diagonal counts to ``n`` and take the excess evenly out of that column's noise cells."""
    diag = prune.diagonal()
    new_diag = np.maximum(diag, n)
    per_cell = (new_diag - diag) / np.maximum(np.count_nonzero(prune, axis=0) - 1.0, 1.0)
    out = np.clip(prune - per_cell[None, :], 0, None)
    np.fill_diagonal(out, new_diag)
    return np.floor(out).astype(int)


def _prune_by_noise_rate(labels, pred_probs, prune: np.ndarray) -> np.ndarray:
    """For each cell (true j, given k), flag the prune[j, k] images given k with the largest p[j] − p[k]."""
    mask = np.zeros(len(labels), bool)
    K = pred_probs.shape[1]
    for k in range(K):
        idx = np.flatnonzero(labels == k)
        if len(idx) <= 1:
            continue
        for j in range(K):
            if j != k and prune[j, k] > 0:
                margin = pred_probs[idx, j] - pred_probs[idx, k]
                mask[idx[np.argsort(-margin, kind="stable")[: prune[j, k]]]] = True
    return mask


def _prune_by_class(labels, pred_probs, prune: np.ndarray) -> np.ndarray:
    """Per given class k, flag its (count − prune[k, k]) images with the lowest p[k]."""
    mask = np.zeros(len(labels), bool)
    for k in range(pred_probs.shape[1]):
        idx = np.flatnonzero(labels == k)
        m = len(idx) - prune[k, k]
        if len(idx) > 1 and m >= 1:
            mask[idx[np.argsort(pred_probs[idx, k], kind="stable")[:m]]] = True
    return mask


def find_label_issues(
    labels,
    pred_probs,
    *,
    filter_by: str = "prune_by_noise_rate",
    rank_by: str = "self_confidence",
    min_examples_per_class: int = 1,
) -> pd.DataFrame:
    """One row per image: index, given_label, predicted_label, self_confidence, normalized_margin,
    score (1 − the ``rank_by`` quality; higher = more likely mislabelled), is_issue, rank (1 = most
    suspicious; flagged images first). ``filter_by``: "prune_by_noise_rate" (default), "prune_by_class",
    "both" (intersection) or "union". Images whose given label is the argmax are never flagged.
    """
    if filter_by not in FILTERS:
        raise ValueError(f"unknown filter_by {filter_by!r}; choose one of {', '.join(FILTERS)}")
    if rank_by not in RANKINGS:
        raise ValueError(f"unknown rank_by {rank_by!r}; choose one of {', '.join(RANKINGS)}")
    y, p = validate(labels, pred_probs)
    n, K = p.shape
    rows = np.arange(n)
    prune = _keep_at_least_n_per_class(confident_joint(y, p).T, min_examples_per_class)
    by_rate = _prune_by_noise_rate(y, p, prune) if filter_by != "prune_by_class" else None
    by_class = _prune_by_class(y, p, prune) if filter_by != "prune_by_noise_rate" else None
    if filter_by == "both":
        mask = by_rate & by_class
    elif filter_by == "union":
        mask = by_rate | by_class
    else:
        mask = by_rate if by_rate is not None else by_class
    boosted = p.copy()
    boosted[rows, y] += 1e-6
    mask &= boosted.argmax(axis=1) != y
    self_conf = p[rows, y]
    others = p.copy()
    others[rows, y] = -np.inf
    margin = (self_conf - others.max(axis=1) + 1) / 2
    score = 1 - (self_conf if rank_by == "self_confidence" else margin)
    order = np.lexsort((rows, -score, ~mask))
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(1, n + 1)
    return pd.DataFrame(
        {
            "index": rows,
            "given_label": y,
            "predicted_label": p.argmax(axis=1),
            "self_confidence": self_conf,
            "normalized_margin": margin,
            "score": score,
            "is_issue": mask,
            "rank": rank,
        }
    )


def auroc(scores, positive) -> float:
    """Area under the ROC curve via the Mann–Whitney U statistic (ties count half)."""
    s, pos = np.asarray(scores, float), np.asarray(positive, bool)
    n1, n0 = pos.sum(), (~pos).sum()
    if n1 == 0 or n0 == 0:
        raise ValueError("AUROC needs both positive and negative examples")
    r = stats.rankdata(s)
    return float((r[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _int_column(values: pd.Series, path: Path) -> np.ndarray:
    num = pd.to_numeric(values, errors="coerce")
    bad = (num.isna() | (num != np.round(num))).to_numpy()
    if bad.any():
        r = int(np.argmax(bad))
        raise InputError(path, f"label {values.iloc[r]!r} is not an integer class index", row=r + 1)
    return num.to_numpy().astype(np.int64)


def read_labels(path: str | Path) -> np.ndarray:
    """Labels from .npy (1-D ints), .csv or .parquet (a ``label`` column, or the only column)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".csv":
            df = pd.read_csv(path, dtype=str, header=None, keep_default_na=False, na_values=[""])
            first = str(df.iat[0, 0]).strip()
            if df.shape[1] > 1 or not first.lstrip("-").isdigit():
                df = df.iloc[1:].set_axis(df.iloc[0].astype(str).tolist(), axis=1).reset_index(drop=True)
        elif suffix in (".parquet", ".pq"):
            df = pd.read_parquet(path)
        else:
            raise InputError(path, f"unsupported labels file type {suffix!r}; use .npy, .csv or .parquet")
    except InputError:
        raise
    except UnicodeDecodeError:
        raise InputError(path, "CSV is not valid UTF-8") from None
    except pd.errors.EmptyDataError:
        raise InputError(path, "file is empty") from None
    except Exception as e:  # numpy/pyarrow raise many types for corrupt files
        raise InputError(path, f"cannot read labels ({e})") from None
    if "label" in df.columns:
        col = df["label"]
    elif df.shape[1] == 1:
        col = df.iloc[:, 0]
    else:
        raise InputError(path, f"need a 'label' column or a single column; found {list(df.columns)}")
    if len(col) == 0:
        raise InputError(path, "file has no rows")
    return _int_column(col, path)


def read_pred_probs(path: str | Path) -> np.ndarray:
    """Probabilities from .npy (n × K) or .parquet (one numeric column per class, in class order)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix in (".parquet", ".pq"):
            df = pd.read_parquet(path)
        else:
            raise InputError(path, f"unsupported pred_probs file type {suffix!r}; use .npy or .parquet")
    except InputError:
        raise
    except Exception as e:
        raise InputError(path, f"cannot read pred_probs ({e})") from None
    non_num = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if non_num:
        raise InputError(path, f"non-numeric column(s) {non_num}; expected one probability column per class")
    return df.to_numpy(np.float64)


def run_find_label_issues(
    labels_path: str | Path, pred_probs_path: str | Path, out_path: str | Path | None = None, top: int = 20
) -> pd.DataFrame:
    """File front-end for the CLI: writes CSV/Parquet by ``out_path``'s extension, or prints the
    ``top`` flagged rows when ``out_path`` is None. Returns the full table."""
    out = Path(out_path) if out_path is not None else None
    if out is not None and out.suffix.lower() not in (".csv", ".parquet"):
        raise InputError(out, "output must end in .csv or .parquet")
    result = find_label_issues(read_labels(labels_path), read_pred_probs(pred_probs_path))
    if out is None:
        print(result[result["is_issue"]].sort_values("rank").head(top).to_string(index=False))
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix.lower() == ".csv":
            result.to_csv(out, index=False)
        else:
            result.to_parquet(out, index=False)
    return result
