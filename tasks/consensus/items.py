"""Image-level (item) label consensus: majority vote and Dawid–Skene EM with gold clamping.

Several labellers answer per image; downstream stages need one label per image with an honest
confidence, plus an estimate of how reliable each labeller is. Everything is integer-coded and
vectorised with ``np.bincount`` so the cost is linear in the number of answers.

Reference (expert) labellers never vote (see docs/contracts.md): their answers, together with an
optional gold table, clamp an item's posterior to the gold class during EM. Clamped items still feed
the other labellers' confusion matrices, which is what makes a little gold help everywhere else.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from tasks.store.errors import InputError

METHODS = ("mv", "ds")
LABEL_COLUMNS = ("item_id", "labeller_id", "label")
GOLD_COLUMNS = ("item_id", "label")
_TRUE = {"true", "t", "1", "yes", "y"}
_FALSE = {"false", "f", "0", "no", "n", ""}


@dataclass(frozen=True)
class ItemConsensus:
    """Result of :func:`item_consensus`.

    ``items``: item_id, label, posterior (probability of the chosen label), entropy (nats), n_labels
    (non-reference answers), method ("ds", "mv" or "gold" for clamped items).
    ``labellers``: labeller_id, n_labels, n_scored, accuracy, accuracy_lo, accuracy_hi (90% Jeffreys
    interval), accuracy_basis ("gold" when the labeller answered gold items, else "consensus").
    ``confusion``: long table labeller_id, true_label, given_label, probability (rows sum to 1).
    """

    items: pd.DataFrame
    labellers: pd.DataFrame
    confusion: pd.DataFrame
    classes: tuple[str, ...]
    n_iter: int
    converged: bool


@dataclass(frozen=True)
class _Coded:
    """Integer-coded answers: one entry of ``i, w, c`` per answer; ``gold`` is -1 where unknown."""

    items: np.ndarray
    labellers: np.ndarray
    classes: np.ndarray
    i: np.ndarray
    w: np.ndarray
    c: np.ndarray
    gold: np.ndarray


def _encode(votes: pd.DataFrame, gold: pd.Series, extra_items: Iterable[str]) -> _Coded:
    """Sorted codes make the result independent of row order (lexical order is also the last tie-break)."""
    items = np.unique(np.concatenate([votes["item_id"].to_numpy(str), np.asarray(list(extra_items), str)]))
    labellers = np.unique(votes["labeller_id"].to_numpy(str))
    classes = np.unique(np.concatenate([votes["label"].to_numpy(str), gold.to_numpy(str)]))
    g = np.full(len(items), -1)
    if len(gold):
        g[np.searchsorted(items, gold.index.to_numpy(str))] = np.searchsorted(classes, gold.to_numpy(str))
    return _Coded(
        items=items,
        labellers=labellers,
        classes=classes,
        i=np.searchsorted(items, votes["item_id"].to_numpy(str)),
        w=np.searchsorted(labellers, votes["labeller_id"].to_numpy(str)),
        c=np.searchsorted(classes, votes["label"].to_numpy(str)),
        gold=g,
    )


def _per_item(cd: _Coded, values: np.ndarray) -> np.ndarray:
    """Sum an (answers × K) array into (items × K) with one bincount."""
    K = values.shape[1]
    idx = (cd.i[:, None] * K + np.arange(K)).ravel()
    return np.bincount(idx, weights=values.ravel(), minlength=len(cd.items) * K).reshape(-1, K)


def _clamp(cd: _Coded, T: np.ndarray) -> np.ndarray:
    has = cd.gold >= 0
    T[has] = 0.0
    T[has, cd.gold[has]] = 1.0
    return T


def _vote_shares(cd: _Coded, weight: np.ndarray) -> np.ndarray:
    """Weighted vote share per item and class; items without votes get a uniform row."""
    K = len(cd.classes)
    counts = _per_item(cd, np.eye(K)[cd.c] * weight[cd.w][:, None])
    total = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, total, out=np.full_like(counts, 1.0 / K), where=total > 0)


def _m_step(cd: _Coded, T: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Class priors and per-labeller confusion (labeller, true, given), with Dirichlet(alpha) smoothing."""
    K, W = len(cd.classes), len(cd.labellers)
    idx = ((cd.w * K * K)[:, None] + np.arange(K) * K + cd.c[:, None]).ravel()
    counts = np.bincount(idx, weights=T[cd.i].ravel(), minlength=W * K * K).reshape(W, K, K) + alpha
    prior = T.sum(axis=0) + alpha
    return prior / prior.sum(), counts / counts.sum(axis=2, keepdims=True)


def _dawid_skene(cd: _Coded, n_iter: int, tol: float, alpha: float):
    """EM from the majority-vote shares; stops when the log-likelihood's relative change is below ``tol``."""
    T = _clamp(cd, _vote_shares(cd, np.ones(len(cd.labellers))))
    has_gold = cd.gold >= 0
    old, converged, it = -np.inf, False, 0
    for it in range(1, n_iter + 1):  # noqa: B007 - the last value is reported
        prior, conf = _m_step(cd, T, alpha)
        logp = np.log(prior) + _per_item(cd, np.log(conf)[cd.w, :, cd.c])
        top = logp.max(axis=1, keepdims=True)
        norm = top[:, 0] + np.log(np.exp(logp - top).sum(axis=1))
        ll = norm[~has_gold].sum() + logp[has_gold, cd.gold[has_gold]].sum()
        T = _clamp(cd, np.exp(logp - norm[:, None]))
        if abs(ll - old) <= tol * abs(ll):
            converged = True
            break
        old = ll
    prior, conf = _m_step(cd, T, alpha)
    return T, prior, conf, it, converged


def _pick(T: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Argmax with deterministic ties: highest class prior wins, then the lexically first class."""
    tied = T.max(axis=1, keepdims=True) - 1e-12 <= T
    return np.argmax(np.where(tied, prior[None, :], -np.inf), axis=1)


def jeffreys_interval(k: np.ndarray, n: np.ndarray, level: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """Jeffreys Beta(k+½, n−k+½) interval; honest for small n, where most labellers live."""
    k, n = np.asarray(k, float), np.asarray(n, float)
    a = (1 - level) / 2
    with np.errstate(invalid="ignore"):
        lo = np.where(k > 0, stats.beta.ppf(a, k + 0.5, n - k + 0.5), 0.0)
        hi = np.where(k < n, stats.beta.ppf(1 - a, k + 0.5, n - k + 0.5), 1.0)
    empty = n == 0
    return np.where(empty, np.nan, lo), np.where(empty, np.nan, hi)


def _labeller_table(cd: _Coded, chosen: np.ndarray, conf: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    W, K = len(cd.labellers), len(cd.classes)
    on_gold = cd.gold[cd.i] >= 0
    gold_n = np.bincount(cd.w, weights=on_gold, minlength=W)
    use_gold = gold_n[cd.w] > 0
    scored = np.where(use_gold, on_gold, True)
    truth = np.where(use_gold, cd.gold[cd.i], chosen[cd.i])
    n = np.bincount(cd.w, weights=scored, minlength=W)
    k = np.bincount(cd.w, weights=scored & (truth == cd.c), minlength=W)
    lo, hi = jeffreys_interval(k, n)
    labellers = pd.DataFrame(
        {
            "labeller_id": cd.labellers,
            "n_labels": np.bincount(cd.w, minlength=W),
            "n_scored": n.astype(int),
            "accuracy": np.divide(k, n, out=np.full(W, np.nan), where=n > 0),
            "accuracy_lo": lo,
            "accuracy_hi": hi,
            "accuracy_basis": np.where(gold_n > 0, "gold", "consensus"),
        }
    )
    confusion = pd.DataFrame(
        {
            "labeller_id": np.repeat(cd.labellers, K * K),
            "true_label": np.tile(np.repeat(cd.classes, K), W),
            "given_label": np.tile(cd.classes, W * K),
            "probability": conf.ravel(),
        }
    )
    return labellers, confusion


def _reference_mask(labels: pd.DataFrame, reference_labellers: Iterable[str]) -> np.ndarray:
    ref = labels["labeller_id"].isin({str(r) for r in reference_labellers}).to_numpy()
    if "is_reference" in labels.columns:
        ref = ref | labels["is_reference"].astype(str).str.strip().str.lower().isin(_TRUE).to_numpy()
    return ref


def item_consensus(
    labels: pd.DataFrame,
    gold: pd.DataFrame | None = None,
    *,
    method: str = "ds",
    reference_labellers: Iterable[str] = (),
    weights: Mapping[str, float] | None = None,
    n_iter: int = 100,
    tol: float = 1e-8,
    smoothing: float = 0.01,
) -> ItemConsensus:
    """One label per item from answers ``item_id, labeller_id, label`` (ids and labels are str).

    ``method="mv"``: (optionally ``weights``-weighted) majority vote; posterior = vote share.
    ``method="ds"``: Dawid–Skene EM (full confusion per labeller, class priors, MV initialisation,
    ``smoothing`` pseudo-counts). Ties in both: the class with the larger prior (total vote weight for
    MV, the EM prior for DS) wins, then the lexically smaller label.
    Gold comes from ``gold`` (``item_id, label``; wins on conflict) and from answers of
    ``reference_labellers`` or rows with a true ``is_reference`` column (their majority per item).
    Such items are reported with method "gold" and posterior 1; gold for unknown items is ignored.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    missing = [c for c in LABEL_COLUMNS if c not in labels.columns]
    if missing:
        raise ValueError(f"labels table is missing column(s) {missing}")
    bad = labels[list(LABEL_COLUMNS)].isna().any(axis=1).to_numpy()
    bad = bad | labels.duplicated(["item_id", "labeller_id"]).to_numpy()
    if bad.any():
        raise ValueError(
            f"labels row {int(np.argmax(bad)) + 1}: empty value or repeated (item_id, labeller_id)"
        )
    labels = labels.astype({c: str for c in LABEL_COLUMNS})
    ref = _reference_mask(labels, reference_labellers)
    votes, refs = labels[~ref], labels[ref]
    gold_s = pd.Series(dtype=str)
    if len(refs):
        rc = _encode(refs, pd.Series(dtype=str), ())
        share = _vote_shares(rc, np.ones(len(rc.labellers)))
        gold_s = pd.Series(rc.classes[_pick(share, np.bincount(rc.c, minlength=len(rc.classes)))], rc.items)
    if gold is not None and len(gold):
        g = gold.astype({c: str for c in GOLD_COLUMNS}).set_index("item_id")["label"]
        gold_s = g.combine_first(gold_s) if len(gold_s) else g
    known = set(votes["item_id"]) | set(refs["item_id"])
    gold_s = gold_s[gold_s.index.isin(known)]
    cd = _encode(votes, gold_s, refs["item_id"].unique())
    if method == "ds":
        T, prior, conf, it, converged = _dawid_skene(cd, n_iter, tol, smoothing)
    else:
        wt = np.ones(len(cd.labellers))
        if weights is not None:
            wt = np.array([float(weights.get(lab, 1.0)) for lab in cd.labellers])
            if not np.all(np.isfinite(wt) & (wt > 0)):
                raise ValueError("labeller weights must be finite and > 0")
        T = _clamp(cd, _vote_shares(cd, wt))
        prior = np.bincount(cd.c, weights=wt[cd.w], minlength=len(cd.classes))
        conf, it, converged = _m_step(cd, T, smoothing)[1], 0, True
    chosen = _pick(T, prior)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(T > 0, T * np.log(T), 0.0).sum(axis=1)
    items = pd.DataFrame(
        {
            "item_id": cd.items,
            "label": cd.classes[chosen],
            "posterior": T[np.arange(len(chosen)), chosen],
            "entropy": np.maximum(entropy, 0.0),
            "n_labels": np.bincount(cd.i, minlength=len(cd.items)),
            "method": np.where(cd.gold >= 0, "gold", method),
        }
    )
    labellers, confusion = _labeller_table(cd, chosen, conf)
    return ItemConsensus(items, labellers, confusion, tuple(map(str, cd.classes)), it, converged)


def read_table(path: str | Path, required: Iterable[str]) -> pd.DataFrame:
    """Read CSV (UTF-8) or Parquet with ``required`` columns as str; rows in errors are 1-based data rows.

    Answer files of other tools (e.g. ``question,worker,answer``) must be renamed to the required names
    first: one fixed schema keeps every stage and error message the same.
    """
    path, required = Path(path), list(required)
    if not path.is_file():
        raise InputError(path, "file not found")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        raw = path.read_bytes()
        if not raw.strip():
            raise InputError(path, "file is empty")
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n")
            if line == 0:
                raise InputError(path, f"header is not valid UTF-8 (byte {e.start})") from None
            raise InputError(path, f"not valid UTF-8 (byte {e.start})", row=line) from None
        try:
            df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_values=[""])
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
            raise InputError(path, f"not a valid CSV file ({e})") from None
    elif suffix in (".parquet", ".pq"):
        try:
            df = pd.read_parquet(path)
        except Exception as e:  # pyarrow raises several unrelated types for corrupt files
            raise InputError(path, f"not a readable Parquet file ({e})") from None
    else:
        raise InputError(path, f"unsupported file type {suffix!r}; use .csv or .parquet")
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(path, f"missing required column(s) {missing}; found {list(map(str, df.columns))}")
    if df.empty:
        raise InputError(path, "file has a header but no rows")
    for col in required:
        null = df[col].isna().to_numpy()
        if null.any():
            raise InputError(path, f"empty value in column {col!r}", row=int(np.argmax(null)) + 1)
        df[col] = df[col].astype(str)
    return df.reset_index(drop=True)


def _check_duplicates(df: pd.DataFrame, key: list[str], path: Path) -> None:
    dup = df.duplicated(key, keep=False).to_numpy()
    if dup.sum():
        rows = np.flatnonzero(dup)
        first = rows[0]
        same = np.flatnonzero((df.loc[rows, key] == df.loc[first, key]).all(axis=1).to_numpy())
        row = int(rows[same[1]]) + 1
        vals = ", ".join(repr(df.at[first, k]) for k in key)
        raise InputError(path, f"duplicate ({', '.join(key)}) = ({vals}); first seen at row {first + 1}", row)


def _write(df: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path, index=False)


def run_item_consensus(
    labels_path: str | Path,
    gold_path: str | Path | None = None,
    method: str = "ds",
    out_path: str | Path | None = None,
    reference_labellers: Iterable[str] = (),
) -> ItemConsensus:
    """File front-end of :func:`item_consensus` for the CLI.

    Reads ``item_id, labeller_id, label`` (+ optional ``is_reference``) and gold ``item_id, label``
    from CSV or Parquet. Writes items to ``out_path`` and, beside it, ``<stem>.labellers<ext>`` and
    ``<stem>.confusion<ext>`` (extension picks CSV or Parquet). Raises ``InputError`` on bad files and
    ``ValueError`` on an unknown method, before any work is done.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    out = Path(out_path) if out_path is not None else None
    if out is not None and out.suffix.lower() not in (".csv", ".parquet"):
        raise InputError(out, "output must end in .csv or .parquet")
    labels_path = Path(labels_path)
    labels = read_table(labels_path, LABEL_COLUMNS)
    _check_duplicates(labels, ["item_id", "labeller_id"], labels_path)
    if "is_reference" in labels.columns:
        flag = labels["is_reference"].fillna("").astype(str).str.strip().str.lower()
        bad = ~flag.isin(_TRUE | _FALSE).to_numpy()
        if bad.any():
            r = int(np.argmax(bad))
            raise InputError(labels_path, f"is_reference must be true/false, got {flag[r]!r}", row=r + 1)
    gold = None
    if gold_path is not None:
        gold = read_table(gold_path, GOLD_COLUMNS)
        _check_duplicates(gold, ["item_id"], Path(gold_path))
    result = item_consensus(labels, gold, method=method, reference_labellers=reference_labellers)
    if out is not None:
        _write(result.items, out)
        _write(result.labellers, out.with_name(f"{out.stem}.labellers{out.suffix}"))
        _write(result.confusion, out.with_name(f"{out.stem}.confusion{out.suffix}"))
    return result
