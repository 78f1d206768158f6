"""Tables the learn stages (pseudo-labels, label issues) write."""

from __future__ import annotations

import pandera.pandas as pa

from schemas.tables.core import _FRACTION, _UNIT, _UNIT_OR_NAN, ID, Col, TableSpec, _ids  # noqa: F401

ISSUE_KINDS = (
    "missed_field", "spurious_field", "boundary", "model_only", "empty_assignment", "possible_spammer",
)  # fmt: skip

LABEL_ISSUES = TableSpec(
    "label_issues",
    "Pixel confident-learning issues of crowd assignments as regions, ranked over the dataset "
    "(docs/label_issues.md); native CRS, one part per CRS, rows sorted by site_id, labeller_id, issue_id "
    "(sort by rank for the review queue; ranks are global: every reprocess rewrites the parts).",
    {
        "issue_id": _ids("site_id/labeller_id/ordinal within the assignment."),
        "site_id": _ids("Site."),
        "labeller_id": _ids("Crowd labeller whose assignment has the issue."),
        "kind": Col(ID, "Issue kind.", checks=(pa.Check.isin(ISSUE_KINDS),)),
        "rank": Col("int64", "1 = fix first (score descending).", checks=(pa.Check.ge(1),)),
        "score": Col(
            float,
            "area_m2 x mean margin (t_given - p_given) x weight (consensus agreement share; without an "
            "independent consensus the labeller's gold error rate 1 - iou_pooled, else 0.5).",
            checks=(pa.Check.ge(0),),
        ),
        "area_m2": Col(float, "Flagged area of the region.", checks=(pa.Check.gt(0),)),
        "n_pixels": Col("int64", "Flagged pixels in the region.", checks=(pa.Check.gt(0),)),
        "mean_p_field": Col(float, "Mean model p(field) over the region.", checks=_UNIT),
        "consensus_agreement": Col(
            float,
            "Share of the region where the consensus disagrees with the labeller; NaN = no consensus "
            "independent of this labeller.",
            True,
            _UNIT_OR_NAN,
        ),
        "labeller_polygon_id": Col(ID, "The labeller's polygon involved (labels.polygon_id), if any.", True),
        "evidence": Col(ID, "JSON: areas, margins, thresholds, consensus, probability source, gold record."),
        "geometry": Col(object, "Region (Polygon or MultiPolygon, pixel-exact) in the site's native CRS."),
    },
    ("issue_id",),
    geometry=True,
)

ASSIGNMENT_ISSUES = TableSpec(
    "assignment_issues",
    "Per crowd assignment: flagged share and summed issue score, ranked (1 = review first).",
    {
        "site_id": _ids("Site."),
        "labeller_id": _ids("Crowd labeller."),
        "n_issues": Col("int64", "Rows of label_issues for this assignment.", checks=(pa.Check.ge(0),)),
        "flagged_fraction": Col(float, "Flagged pixels / scored footprint pixels.", checks=_UNIT),
        "issue_score": Col(float, "Sum of the assignment's issue scores.", checks=(pa.Check.ge(0),)),
        "rank": Col("int64", "1 = review first (issue_score descending).", checks=(pa.Check.ge(1),)),
        "n_pixels": Col("int64", "Scored footprint pixels (with a prediction).", checks=(pa.Check.ge(0),)),
        "drawn_fraction": Col(float, "Share of scored pixels the labeller drew as field.", checks=_UNIT),
        "flagged_drawn_fraction": Col(float, "Share of the drawn pixels flagged.", checks=_UNIT),
        "flagged_union_fraction": Col(
            float, "Flagged px / px the labeller or the model calls field (spammer test).", False, _UNIT
        ),
        "model_field_fraction": Col(float, "Share of scored pixels with p(field) >= 0.5.", checks=_UNIT),
        "consensus_field_fraction": Col(
            float, "Consensus field share; NaN = no independent consensus.", True, _UNIT_OR_NAN
        ),
        "summary_kind": Col(
            ID, "empty_assignment | possible_spammer when the whole assignment is wrong.", True
        ),
    },
    ("site_id", "labeller_id"),
)

LABEL_ISSUE_STATS = TableSpec(
    "label_issue_stats",
    "Sufficient statistic of the label-issues fit: per site, the (given class x p(field) bin) pixel "
    "histogram of its crowd assignments, so a reprocess re-reads only the sites whose inputs changed; unit "
    "'*' is the pooled histogram the flags in use were fitted from (a reprocess without refit carries it "
    "while the refit moves by at most settings.learn.label_issues.carry_close), unit '+' the exact sum of "
    "every site's. Kept in parts of sites (an unchanged part is shared with the previous version) and "
    "pooled.parquet ('*', '+'): a reprocess reads the key columns, the rows of changed sites and '+'.",
    {
        "unit_id": _ids("Site; '*' the pooled histogram behind the flags in use; '+' the sum of the sites'."),
        "key": Col(
            ID,
            "BLAKE2b-128 hex: the site's inputs behind its histogram (rasters, labels, parameters, code); "
            "for '*' and '+' the histogram itself.",
            checks=(pa.Check.str_length(32, 32),),
        ),
        "n_bins": Col("int64", "p(field) bins per given class.", checks=(pa.Check.ge(1),)),
        "n_pixels": Col("int64", "Pixels counted (the histogram's total).", checks=(pa.Check.ge(0),)),
        "cells": Col(object, "Non-zero cells (given class x n_bins + bin) as little-endian uint32 bytes."),
        "counts": Col(object, "Their pixel counts as little-endian int64 bytes."),
    },
    ("unit_id",),
)

PSEUDO_LABELS = TableSpec(
    "pseudo_labels",
    "Model field polygons on unlabelled sites (and second opinions on single-labeller sites), with "
    "confidence and whether they pass their class threshold (docs/learn.md); native CRS, in parts of "
    "64 sites per CRS named by their sites' keys and the thresholds (unchanged parts are shared "
    "between versions).",
    {
        "polygon_id": _ids("site_id-p<ordinal>."),
        "site_id": _ids("Site."),
        "class": _ids("Polygon class ('field': the model separates field interior from boundary only)."),
        "confidence": Col(float, "Mean predicted field probability inside the polygon.", checks=_UNIT),
        "source": Col(
            ID,
            "unlabelled | single_second_opinion.",
            checks=(pa.Check.isin(("unlabelled", "single_second_opinion")),),
        ),
        "kept": Col(bool, "confidence >= the class threshold in pseudo_label_thresholds."),
        "geometry": Col(object, "Polygon (pixel-exact edges) in the site's native CRS."),
    },
    ("polygon_id",),
    geometry=True,
)

PSEUDO_LABEL_THRESHOLDS = TableSpec(
    "pseudo_label_thresholds",
    "Per class: the lowest confidence whose out-of-sample polygons reach the target precision (on gold "
    "sites, or gold and multi when gold is thin), with the precision and recall measured there.",
    {
        "class": _ids("Polygon class."),
        "threshold": Col(
            float, "Keep polygons with confidence >= this; inf = no threshold reaches the target."
        ),
        "precision": Col(float, "Polygon precision at the threshold (IoU >= 0.5); NaN = nothing kept.", True),
        "precision_lower": Col(float, "One-sided 90% Wilson lower bound of that precision.", True),
        "recall": Col(float, "Share of target polygons matched by a kept polygon.", True),
        "n_polygons": Col("int64", "Out-of-sample polygons kept at the threshold.", checks=(pa.Check.ge(0),)),
        "basis": Col(ID, "Sites the threshold was measured on: gold, or gold+multi when gold is too thin."),
        "consensus_precision": Col(float, "Precision at the threshold on consensus (multi) sites.", True),
        "consensus_recall": Col(float, "Recall at the threshold on consensus (multi) sites.", True),
        "target_precision": Col(float, "The precision asked for.", checks=_UNIT),
        "n_candidates": Col("int64", "Out-of-sample polygons on the basis sites.", checks=(pa.Check.ge(0),)),
        "n_target_polygons": Col("int64", "Target polygons on the basis sites.", checks=(pa.Check.ge(0),)),
        "n_sites": Col("int64", "Basis sites with out-of-sample probabilities."),
    },
    ("class",),
)
