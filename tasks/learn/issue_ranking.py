"""Scores, evidence and ranks of the ``label_issues`` tables (1 = fix first), over the whole dataset.

Per-row values depend only on their own assignment, the fit, the labeller's gold record and parameters,
so an unchanged site's rows can be taken over from the previous version and ranked with the rest.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from tasks.learn.pixel_issues import KINDS, IssueParams

ISSUE_COLUMNS = [
    "issue_id", "site_id", "labeller_id", "kind", "rank", "score", "area_m2", "n_pixels", "mean_p_field",
    "consensus_agreement", "labeller_polygon_id", "evidence", "crs", "geometry",
]  # fmt: skip
SUMMARY_COLUMNS = [
    "site_id", "labeller_id", "n_issues", "flagged_fraction", "issue_score", "rank", "n_pixels",
    "drawn_fraction", "flagged_drawn_fraction", "flagged_union_fraction", "model_field_fraction",
    "consensus_field_fraction", "consensus_independent", "summary_kind",
] + [f"n_{k}" for k in KINDS[:4]]  # fmt: skip


def _clean(v):
    if isinstance(v, float | np.floating):
        return None if not math.isfinite(v) else round(float(v), 6)
    if isinstance(v, np.integer | np.bool_):
        return v.item()
    return v


def _evidence(r, cols: list[str], common: dict, gold: dict | None) -> str:
    ev = {c: _clean(getattr(r, c)) for c in cols} | common | {"labeller_gold": gold}
    if isinstance(r.regions, dict):
        ev["regions"] = r.regions  # region counts behind a whole-assignment issue
    return json.dumps(ev, sort_keys=True)


def gold_records(lq: pd.DataFrame | None) -> dict[str, dict]:
    cols = [
        c for c in ("n_gold", "iou_pooled", "iou_mean", "lacuna_score_mean") if lq is not None and c in lq
    ]
    rows = lq[["labeller_id", *cols]].to_dict("records") if lq is not None and len(lq) else []
    return {str(r.pop("labeller_id")): {k: _clean(v) for k, v in r.items()} for r in rows}


def uncorroborated_weight(gold: dict | None, params: IssueParams) -> float:
    """Weight of model-only evidence: the labeller's gold error rate 1 - iou_pooled (>= 0.05) when known (a
    labeller who is usually right is likelier right where only the model disagrees), else the default."""
    iou = (gold or {}).get("iou_pooled")
    if params.gold_weighting and iou is not None and (gold or {}).get("n_gold"):
        return float(np.clip(1.0 - iou, 0.05, 1.0))
    return params.uncorroborated_weight


def rank_tables(
    issues: list[dict],
    summaries: list[dict],
    labeller_quality: pd.DataFrame | None,
    source: str,
    thresholds: Sequence[float] = (),
    params: IssueParams | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Final scores (gold-weighted where there is no independent consensus), ranks over the whole
    dataset (1 = fix first: score desc, ties by ids), assignment totals, and the evidence JSON."""
    return rank_frames(*score_tables(issues, summaries, labeller_quality, source, thresholds, params))


def score_tables(
    issues: list[dict],
    summaries: list[dict],
    labeller_quality: pd.DataFrame | None,
    source: str,
    thresholds: Sequence[float] = (),
    params: IssueParams | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-row part of ``rank_tables``: final scores and evidence, no ranks or totals. Every value of a
    row depends only on its own assignment, the fit, the gold record and parameters (so an unchanged
    site's rows can be taken over from the previous version and ranked with the rest)."""
    params = params or IssueParams()
    gold = gold_records(labeller_quality)
    extra = ["mean_margin", "zone_share", "offset_px", "consensus_independent", "regions",
             "uncorroborated_base"]  # fmt: skip
    li = pd.DataFrame(issues, columns=[c for c in ISSUE_COLUMNS if c not in ("rank", "evidence")] + extra)
    w = np.array([uncorroborated_weight(gold.get(lid), params) for lid in li["labeller_id"]], float)
    base = li["uncorroborated_base"].to_numpy(float)
    li["score"] = li["score"].to_numpy(float) + base * (w - params.uncorroborated_weight)
    li["weight"] = np.where(li["consensus_agreement"].isna(), w, li["consensus_agreement"].astype(float))
    ev_cols = ["area_m2", "n_pixels", "mean_p_field", "mean_margin", "consensus_agreement", "weight",
               "consensus_independent", "zone_share", "offset_px", "labeller_polygon_id"]  # fmt: skip
    common = {"probability_source": source, "thresholds": [_clean(t) for t in thresholds]}
    li["evidence"] = [_evidence(r, ev_cols, common, gold.get(r.labeller_id)) for r in li.itertuples()]
    floats = {c: float for c in ("score", "area_m2", "mean_p_field", "consensus_agreement")}
    li = li[[c for c in ISSUE_COLUMNS if c != "rank"]].astype(floats | {"n_pixels": np.int64})
    ai = pd.DataFrame(summaries, columns=[c for c in SUMMARY_COLUMNS if c not in ("rank", "issue_score")])
    return li.reset_index(drop=True), ai


RANK_ORDER = (["score", "site_id", "labeller_id", "issue_id"], [False, True, True, True])


def issue_ranks(li: pd.DataFrame) -> np.ndarray:
    """Each row's rank over all rows of ``li`` (needs score and the three ids): score descending, ties
    broken by the unique ids, so the order is total and the same however the rows were gathered."""
    order = li.sort_values(RANK_ORDER[0], ascending=RANK_ORDER[1]).index
    ranks = pd.Series(np.arange(1, len(li) + 1, dtype=np.int64), index=order)
    return ranks.reindex(li.index).to_numpy(np.int64)


def rank_frames(
    li: pd.DataFrame, ai: pd.DataFrame, keep: Sequence[str] = ()
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Ranks over the whole dataset (ties broken by the unique ids, so the order is total) and assignment
    totals, from ``score_tables`` frames (``rank`` / ``issue_score`` columns, if any, are recomputed).
    ``keep``: further columns of ``li`` to carry along (after the table's)."""
    li = li.drop(columns="rank", errors="ignore").reset_index(drop=True)
    li = li.assign(rank=issue_ranks(li)).sort_values("rank")
    floats = {c: float for c in ("score", "area_m2", "mean_p_field", "consensus_agreement")}
    li = li[[*ISSUE_COLUMNS, *keep]].astype(floats | {"n_pixels": np.int64})
    return li.reset_index(drop=True), rank_assignments(ai, li)


def rank_assignments(ai: pd.DataFrame, li: pd.DataFrame) -> pd.DataFrame:
    """Assignment rows with ``issue_score`` (the sum of their issues' scores in ``li``, which needs only
    site_id, labeller_id and score; issue_id for the order of summation) and their rank (1 = review
    first)."""
    ai = ai.drop(columns=["rank", "issue_score"], errors="ignore")
    li = li.sort_values(RANK_ORDER[0], ascending=RANK_ORDER[1])  # float sums in one order, however gathered
    totals = li.groupby(["site_id", "labeller_id"])["score"].sum().rename("issue_score").reset_index()
    ai = ai.merge(totals, on=["site_id", "labeller_id"], how="left").fillna({"issue_score": 0.0})
    ai = ai.sort_values(["issue_score", "flagged_fraction", "site_id", "labeller_id"], ascending=[0, 0, 1, 1])
    ai["rank"] = np.arange(1, len(ai) + 1, dtype=np.int64)
    floats = [c for c in SUMMARY_COLUMNS if c.endswith("fraction")] + ["issue_score"]
    ints = ("n_issues", "n_pixels", *(f"n_{k}" for k in KINDS[:4]))
    dtypes = {c: float for c in floats} | {c: np.int64 for c in ints} | {"consensus_independent": bool}
    return ai[SUMMARY_COLUMNS].astype(dtypes).reset_index(drop=True)
