"""Per-labeller quality from the gold assignments (``labeller_quality`` table).

Meaning of every non-finite value: a labeller with ``n_gold == 0`` (known only from the EM) has NaN
means/intervals/rolling score ("no gold evidence") and ``trusted = False``; ``latent_*`` is NaN for
labellers outside the EM fit ("not fitted", e.g. method "bayes").
"""

from __future__ import annotations

import zlib

import numpy as np
import pandas as pd
from scipy import stats

from tasks.consensus.params import QUALITY_MEASURES, ConsensusParams

_BOUNDS = {"tss": (-1.0, 1.0)}
LATENT_COLUMNS = ["labeller_id", "latent_sensitivity", "latent_specificity", "latent_iou"]


def bootstrap_interval(values: np.ndarray, level: float, n_boot: int, seed) -> tuple[float, float]:
    """Percentile bootstrap of the mean (for >= 2 values; one value carries no spread information, so the
    caller uses the measure's natural range from ``_BOUNDS``, default [0, 1])."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    means = values[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def drift(times: pd.Series, scores: pd.Series, min_tasks: int) -> tuple[float, float]:
    """(slope per day, two-sided p) of score vs completion time.

    Fewer than ``min_tasks`` dated tasks, or all on one instant, give (0.0, 1.0): "no evidence of drift".
    """
    ok = times.notna() & scores.notna()
    t, y = times[ok], scores[ok].astype(float)
    if len(t) < min_tasks:
        return 0.0, 1.0
    days = (t - t.min()).dt.total_seconds().to_numpy() / 86400.0
    if np.ptp(days) == 0:
        return 0.0, 1.0
    if np.ptp(y.to_numpy()) == 0:
        return 0.0, 1.0
    res = stats.linregress(days, y.to_numpy())
    slope = float(res.slope) if np.isfinite(res.slope) else 0.0
    p = float(res.pvalue) if np.isfinite(res.pvalue) else 1.0
    return slope, p


def _seed(params: ConsensusParams, labeller_id: str) -> list[int]:
    return [params.seed, zlib.crc32(labeller_id.encode())]


def _one_labeller(lab_id: str, g: pd.DataFrame, params: ConsensusParams) -> dict:
    g = g.sort_values("completed_at", na_position="first", kind="stable")
    row: dict = {"labeller_id": lab_id, "n_gold": len(g)}
    for m in QUALITY_MEASURES:
        vals = g[m].to_numpy(dtype=float)
        row[f"{m}_mean"] = float(vals.mean())
        if len(vals) >= 2:
            row[f"{m}_lo"], row[f"{m}_hi"] = bootstrap_interval(
                vals, params.interval_level, params.n_bootstrap, _seed(params, lab_id)
            )
        else:
            row[f"{m}_lo"], row[f"{m}_hi"] = _BOUNDS.get(m, (0.0, 1.0))
    tp, fp, fn, tn = (g[f"{k}_m2"].sum() for k in ("tp", "fp", "fn", "tn"))
    # Area-pooled skills avoid the vacuous 1s of single empty-reference sites.
    row["field_skill_pooled"] = float(tp / (tp + fn)) if tp + fn > 0 else row["field_skill_mean"]
    row["nofield_skill_pooled"] = float(tn / (tn + fp)) if tn + fp > 0 else row["nofield_skill_mean"]
    # Ratio of sums: a mean of per-site IoUs swings on tiny / empty sites (0 or 1 each).
    row["iou_pooled"] = float(tp / (tp + fp + fn)) if tp + fp + fn > 0 else 1.0
    score = g[params.trust_measure].astype(float)
    row["rolling_score"] = float(score.iloc[-params.rolling_k :].mean())
    row["trusted"] = bool(row["rolling_score"] >= params.trust_threshold)
    row["drift_slope_per_day"], row["drift_p_value"] = drift(
        pd.to_datetime(g["completed_at"], utc=True), score, params.min_tasks_for_drift
    )
    row["first_gold_at"] = g["completed_at"].min()
    row["last_gold_at"] = g["completed_at"].max()
    return row


def labeller_quality_columns() -> list[str]:
    cols = ["labeller_id", "n_gold"]
    for m in QUALITY_MEASURES:
        cols += [f"{m}_mean", f"{m}_lo", f"{m}_hi"]
    return cols + [
        "field_skill_pooled",
        "nofield_skill_pooled",
        "iou_pooled",
        "rolling_score",
        "trusted",
        "drift_slope_per_day",
        "drift_p_value",
        "first_gold_at",
        "last_gold_at",
        *LATENT_COLUMNS[1:],
    ]


def labeller_quality(
    assignment_quality: pd.DataFrame, params: ConsensusParams, latent: pd.DataFrame | None = None
) -> pd.DataFrame:
    """One row per labeller seen in gold assignments or in the EM (``latent``: labeller_id,
    latent_sensitivity, latent_specificity)."""
    rows = []
    if assignment_quality is not None and len(assignment_quality):
        aq = assignment_quality.copy()
        aq["completed_at"] = pd.to_datetime(aq["completed_at"], utc=True)
        for lab_id, g in aq.groupby("labeller_id", sort=True):
            rows.append(_one_labeller(str(lab_id), g, params))
    out = pd.DataFrame(rows)
    if out.empty:
        out = pd.DataFrame({"labeller_id": pd.Series(dtype=object), "n_gold": pd.Series(dtype="int64")})
    if latent is not None and len(latent):
        lat = latent[[c for c in LATENT_COLUMNS if c in latent.columns]].copy()
        lat["labeller_id"] = lat["labeller_id"].astype(str)
        out["labeller_id"] = out["labeller_id"].astype(str)
        out = out.merge(lat, on="labeller_id", how="outer")
    for c in labeller_quality_columns():
        if c not in out.columns:
            out[c] = np.nan
    out["n_gold"] = out["n_gold"].fillna(0).astype("int64")
    out["trusted"] = out["trusted"].astype(object).where(out["trusted"].notna(), False).astype(bool)
    out["drift_slope_per_day"] = out["drift_slope_per_day"].fillna(0.0)
    out["drift_p_value"] = out["drift_p_value"].fillna(1.0)
    out["first_gold_at"] = pd.to_datetime(out["first_gold_at"], utc=True)
    out["last_gold_at"] = pd.to_datetime(out["last_gold_at"], utc=True)
    return out[labeller_quality_columns()].sort_values("labeller_id", kind="stable").reset_index(drop=True)
