"""Lacuna Bayesian merge (method "bayes").

H(x) = sum_{i: x in F_i} Q_i FS_i / (sum_{i: x in F_i} Q_i FS_i + sum_{i: x not in F_i} Q_i NFS_i)

with Q the labeller's mean gold score (``params.trust_measure``) and FS / NFS the area-pooled field / no-field
skills. Labellers without gold get ``params.default_quality`` (None -> population mean of labellers with
gold) and the population-mean skills; with no gold anywhere the ``fallback_*`` values. A pixel whose
denominator is 0 (every voter has Q*skill = 0) gets H = 0.5, i.e. maximal risk: nobody is informative.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from tasks.consensus.params import ConsensusParams


def _population(lq: pd.DataFrame | None, col: str, fallback: float) -> float:
    if lq is None or lq.empty or col not in lq.columns:
        return fallback
    vals = lq.loc[lq["n_gold"] > 0, col].astype(float)
    vals = vals[np.isfinite(vals)]
    return float(vals.mean()) if len(vals) else fallback


@dataclass(frozen=True)
class BayesWeights:
    """What the merge reads from ``labeller_quality``: (Q, FS, NFS) per labeller with gold (raw, may be
    NaN) and the defaults for everyone else. Small and explicit, so a reprocess can carry it over."""

    table: dict[str, tuple[float, float, float]]
    defaults: tuple[float, float, float]


def bayes_weights(lq: pd.DataFrame | None, params: ConsensusParams) -> BayesWeights:
    q_col = f"{params.trust_measure}_mean"
    q_def = params.default_quality
    if q_def is None:
        q_def = _population(lq, q_col, params.fallback_quality)
    fs_def = _population(lq, "field_skill_pooled", params.fallback_field_skill)
    nfs_def = _population(lq, "nofield_skill_pooled", params.fallback_nofield_skill)
    table = {}
    if lq is not None and not lq.empty:
        has = lq[lq["n_gold"] > 0]
        for r in has.itertuples(index=False):
            d = r._asdict()
            table[str(d["labeller_id"])] = (
                float(d[q_col]),
                float(d["field_skill_pooled"]),
                float(d["nofield_skill_pooled"]),
            )
    return BayesWeights(table, (float(q_def), float(fs_def), float(nfs_def)))


def merge_weights(
    voters: Sequence[str], lq: pd.DataFrame | BayesWeights | None, params: ConsensusParams
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Q, FS, NFS) per voter, defaults applied for labellers without gold (``lq``: the table, or the
    weights already taken from it)."""
    w = lq if isinstance(lq, BayesWeights) else bayes_weights(lq, params)
    q_def, fs_def, nfs_def = w.defaults
    q, fs, nfs = [], [], []
    for v in voters:
        qq, ff, nn = w.table.get(v, w.defaults)
        q.append(qq if np.isfinite(qq) else q_def)
        fs.append(ff if np.isfinite(ff) else fs_def)
        nfs.append(nn if np.isfinite(nn) else nfs_def)
    return np.asarray(q, float), np.asarray(fs, float), np.asarray(nfs, float)


def bayes_merge(field: np.ndarray, q: np.ndarray, fs: np.ndarray, nfs: np.ndarray) -> np.ndarray:
    """H per pixel; ``field`` is (n_voters, n_pixels) bool."""
    f = field.astype(np.float64)
    num = (q * fs) @ f
    den = num + (q * nfs) @ (1.0 - f)
    out = np.full(f.shape[1], 0.5)
    ok = den > 0
    out[ok] = num[ok] / den[ok]
    return out


def bayes_classes(codes: np.ndarray, q: np.ndarray, fs: np.ndarray, params: ConsensusParams) -> np.ndarray:
    """Class code per pixel by Q*FS-weighted vote among voters who gave a class (1..C).

    Pixels where no voter gave a known class get ``unclassed_code``; ties go to the lower code.
    """
    w = q * fs
    n_pix = codes.shape[1]
    best = np.full(n_pix, params.unclassed_code, dtype=np.uint8)
    best_w = np.zeros(n_pix)
    for c in range(1, params.n_classes + 1):
        s = w @ (codes == c).astype(np.float64)
        better = s > best_w
        best[better] = c
        best_w[better] = s[better]
    return best
