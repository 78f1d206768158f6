"""Sections for artifacts of the learn stage (label issues, pseudo-labels), read defensively.

Their schemas were settling while the report was written, so columns are looked up by a short list of
likely names and the section says plainly which artifact is missing instead of failing the report.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from tasks.report.load import Artifacts, first_column
from tasks.report.metrics import histogram, num

ID_COLS = ("site_id", "labeller_id", "item_id", "polygon_id")
SCORE_COLS = ("score", "issue_score", "priority", "margin", "mean_margin", "label_quality", "self_confidence")
KIND_COLS = ("kind", "issue_type", "issue", "type")


def _rank(df: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    if "rank" in df:
        return df.sort_values("rank", kind="stable"), "rank"
    col = first_column(df, *SCORE_COLS)
    if col is None:
        return df, None
    ascending = col in ("label_quality", "self_confidence")  # low quality = most suspicious
    return df.sort_values(col, ascending=ascending, kind="stable", na_position="last"), col


NUMERIC = ("area_m2", "n_pixels", "n_issues", "flagged_fraction")


def _rows(df: pd.DataFrame, n: int, score: str | None, kind: str | None) -> list[dict]:
    """The top ``n`` rows, ids as text and measures as numbers (no geometry, no evidence blobs)."""
    keep = [c for c in ID_COLS if c in df] + [c for c in (kind, score, *NUMERIC) if c and c in df]
    out = []
    for r in df.head(n)[list(dict.fromkeys(keep))].to_dict("records"):
        row = {}
        for k, v in r.items():
            is_num = k == score or k in NUMERIC
            row[k] = num(v) if is_num else (None if v is None or v != v else str(v))
        out.append(row)
    return out


def label_issues_section(art: Artifacts, n: int) -> dict:
    """Ranked issues (site-level regions or image-level items) and per-assignment issue summaries."""
    issues, asg_issues = art.attributes("label_issues"), art.table("assignment_issues")
    missing = [m for m in ("label_issues", "assignment_issues") if m in art.missing]
    if issues is None and asg_issues is None:
        return {"available": False, "missing": missing, "n_issues": None}
    out: dict = {"available": True, "missing": missing}
    if issues is not None:
        ranked, score = _rank(issues)
        kind = first_column(issues, *KIND_COLS)
        out.update(
            n_issues=len(issues),
            score_column=score,
            by_kind={str(k): int(v) for k, v in issues[kind].value_counts().sort_index().items()}
            if kind
            else {},
            top=_rows(ranked, n, score, kind),
            sites_with_issues=int(issues["site_id"].nunique()) if "site_id" in issues else None,
        )
    else:
        out["n_issues"] = None
    if asg_issues is not None:
        ranked, score = _rank(asg_issues)
        kind = first_column(asg_issues, *KIND_COLS, "summary_kind")
        out["assignments"] = {
            "n": len(asg_issues),
            "score_column": score,
            "top": _rows(ranked, n, score, kind),
        }
    return out


def pseudo_labels_section(art: Artifacts, n_examples: int) -> dict:
    """Coverage of unlabelled sites, confidence, per-class threshold with its precision and recall."""
    pl, th = art.attributes("pseudo_labels"), art.table("pseudo_label_thresholds")
    missing = [m for m in ("pseudo_labels", "pseudo_label_thresholds") if m in art.missing]
    if not art.exists("pseudo_probabilities"):
        missing.append("pseudo_probabilities")
    if pl is None and th is None:
        return {"available": False, "missing": missing, "coverage": None}
    out: dict = {"available": True, "missing": missing, "coverage": None}
    sites = art.table("sites")
    unlabelled = set(sites.loc[sites["role"] == "unlabelled", "site_id"].astype(str))
    if pl is not None:
        kept = pl["kept"].astype(bool) if "kept" in pl else pd.Series(True, index=pl.index)
        sid = pl["site_id"].astype(str) if "site_id" in pl else pd.Series("", index=pl.index)
        covered = set(sid[kept])
        conf = first_column(pl, "confidence", "probability", "mean_p_field", "score")
        out.update(
            rows=len(pl),
            kept=int(kept.sum()),
            sites=len(set(sid)),
            sites_kept=len(covered),
            unlabelled_sites=len(unlabelled),
            coverage=num(len(covered & unlabelled) / len(unlabelled)) if unlabelled else None,
            by_source={str(k): int(v) for k, v in pl["source"].value_counts().items()}
            if "source" in pl
            else {},
            confidence_column=conf,
            confidence_hist=histogram(pl[conf], np.linspace(0, 1, 21)) if conf else None,
            mean_confidence=num(pd.to_numeric(pl[conf], errors="coerce").mean()) if conf else None,
            examples=sorted(covered & unlabelled or covered)[:n_examples],
        )
    if th is not None and len(th):
        cols = (
            "threshold",
            "precision",
            "recall",
            "n_polygons",
            "target_precision",
            "n_candidates",
            "n_sites",
        )
        out["thresholds"] = [
            {"class": str(r.get("class", "all")), **{k: num(r.get(k)) for k in cols if k in r}}
            for r in th.to_dict("records")
        ]
    return out


def issue_geometries(art: Artifacts, site_id: str, labeller_id: str | None, issues=None) -> list:
    """Region polygons of one site's issues (native CRS) for the thumbnail, when the table has geometry.
    ``issues``: the table's rows of (at least) that site, when the caller has read them."""
    if issues is None:
        attrs = art.attributes("label_issues")
        if attrs is None or "site_id" not in attrs:
            return []
        issues = art.site_rows("label_issues", [site_id])
    if issues is None or "geometry" not in issues or "site_id" not in issues:
        return []
    sel = issues["site_id"].astype(str) == site_id
    if labeller_id is not None and "labeller_id" in issues:
        sel &= issues["labeller_id"].astype(str) == labeller_id
    return [
        ("issue", g)
        for g in issues.loc[sel, "geometry"]
        if g is not None and not getattr(g, "is_empty", True)
    ]
