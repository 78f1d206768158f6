"""Tables the consensus stage writes."""

from __future__ import annotations

import pandera.pandas as pa

from schemas.tables.core import _FRACTION, _UNIT, _UNIT_OR_NAN, ID, ROLES, Col, TableSpec, _ids  # noqa: F401

ASSIGNMENT_QUALITY = TableSpec(
    "assignment_quality",
    "Each non-reference assignment on a gold site scored against the reference (docs/consensus.md).",
    {
        "site_id": _ids("Gold site."),
        "labeller_id": _ids("Scored labeller."),
        "reference_id": _ids("Reference labeller the assignment is scored against."),
        "completed_at": Col("datetime64[us, UTC]", "When the labeller submitted.", True),
        "lacuna_area": Col(float, "Lacuna Area: area-weighted overall accuracy.", checks=_UNIT),
        "lacuna_n": Col(float, "Lacuna N: share of reference fields matched one-to-one.", checks=_UNIT),
        "lacuna_edge": Col(
            float, "Lacuna Edge ring measure (a perfect boundary scores ~0.011).", checks=_UNIT
        ),
        "lacuna_categorical": Col(
            float, "Lacuna Categorical: right class on correctly located area.", checks=_UNIT
        ),
        "lacuna_score": Col(float, "0.55 Area + 0.225 N + 0.1 Edge + 0.125 Categorical (weights in config)."),
        "iou": Col(float, "Field IoU against the reference (empty vs empty = 1).", checks=_UNIT),
        "field_skill": Col(float, "tp / (tp + fn).", checks=_UNIT),
        "nofield_skill": Col(float, "tn / (tn + fp).", checks=_UNIT),
        "tss": Col(float, "True skill statistic = field skill + no-field skill - 1."),
        "boundary_f": Col(float, "Boundary F-score at tolerance tau (perfect = 1).", checks=_UNIT),
    },
    ("site_id", "labeller_id"),
)

LABELLER_QUALITY = TableSpec(
    "labeller_quality",
    "Per labeller: mean of each measure over gold tasks with a 90% interval, trust, drift, latent skills.",
    {
        "labeller_id": _ids("Labeller."),
        "n_gold": Col("int64", "Gold tasks scored.", checks=(pa.Check.ge(0),)),
        "lacuna_score_mean": Col(float, "Mean Lacuna score over gold tasks; NaN = no gold evidence.", True),
        "iou_mean": Col(float, "Mean IoU over gold tasks; NaN = no gold evidence.", True),
        "rolling_score": Col(float, "Mean score over the last k gold tasks; NaN = no gold.", True),
        "trusted": Col(bool, "rolling_score >= the trust threshold."),
        "drift_slope_per_day": Col(float, "Trend of the score over time (per day); 0 with < 3 tasks.", True),
        "drift_p_value": Col(float, "Significance of the trend; 1 with < 3 tasks.", True),
        "latent_sensitivity": Col(float, "EM sensitivity (pooled over all sites); NaN without EM.", True),
        "latent_specificity": Col(float, "EM specificity (pooled over all sites); NaN without EM.", True),
    },
    ("labeller_id",),
)

SITE_CONSENSUS = TableSpec(
    "site_consensus",
    "Per labelled site: consensus method, risk summaries, field share and agreement.",
    {
        "site_id": _ids("Site."),
        "n_labellers": Col(
            "int64", "Non-reference labellers who completed the site.", checks=(pa.Check.ge(1),)
        ),
        "method": Col(ID, "em | bayes."),
        "mean_risk": Col(float, "Mean over the footprint of r = min(p, 1 - p).", checks=_UNIT),
        "risky_fraction": Col(
            float, "Share of footprint pixels with r above the risk threshold.", checks=_UNIT
        ),
        "field_fraction": Col(float, "Share of the footprint labelled field by consensus.", checks=_UNIT),
        "mean_pairwise_iou": Col(float, "Mean IoU over labeller pairs (1 with one labeller).", checks=_UNIT),
        "fleiss_kappa": Col(float, "Fleiss' kappa over the site's pixels."),
        "krippendorff_alpha": Col(float, "Krippendorff's alpha (nominal) over the site's pixels."),
        "role": Col(ID, "Site role.", checks=(pa.Check.isin(ROLES),)),
        "geometry": Col(object, "Footprint, EPSG:4326."),
    },
    ("site_id",),
    geometry=True,
    geometry_crs="EPSG:4326",
)

CONSENSUS_LABELS = TableSpec(
    "consensus_labels",
    "Consensus field polygons vectorised from the posterior label map, native CRS (parts per CRS and batch "
    "of sites; read the folder as one table).",
    {
        "polygon_id": _ids("site_id/c<ordinal>."),
        "site_id": _ids("Site."),
        "class": Col(
            ID, "Polygon class; null = a field whose class the labellers left unset or split.", True
        ),
        "confidence": Col(float, "Mean posterior field probability inside the polygon.", checks=_UNIT),
        "geometry": Col(object, "Polygon in the site's native CRS."),
    },
    ("polygon_id",),
    geometry=True,
)

CONSENSUS_PATTERN_COUNTS = TableSpec(
    "consensus_pattern_counts",
    "Per site: pixel counts of each unique vote pattern, the pooled EM's input. A later version re-sums "
    "the rows of sites whose inputs are unchanged instead of rasterising them again.",
    {
        "site_id": _ids("Site."),
        "voters": _ids("The site's non-reference labeller ids, sorted, joined by U+001F."),
        "votes": _ids("One digit per voter (same order): 0 background, 1..C class, C+1 unclassed field."),
        "zone": Col("int64", "Pixel zone: 0 interior, 1 edge band.", checks=(pa.Check.isin([0, 1]),)),
        "gold": Col("int64", "Reference class code; -1 off gold sites.", checks=(pa.Check.ge(-1),)),
        "count": Col("int64", "Footprint pixels with this pattern.", checks=(pa.Check.ge(1),)),
    },
    ("site_id", "votes", "zone", "gold"),
)

ITEM_CONSENSUS = TableSpec(
    "item_consensus",
    "Image-level consensus per item (Dawid-Skene with gold clamping).",
    {
        "item_id": _ids("Item."),
        "label": _ids("Consensus class."),
        "posterior": Col(float, "Posterior probability of the chosen class.", checks=_UNIT),
        "entropy": Col(float, "Entropy of the posterior (nats).", checks=(pa.Check.ge(0),)),
        "n_labels": Col("int64", "Answers for the item."),
        "method": Col(ID, "ds | mv | gold (clamped to a reference answer)."),
    },
    ("item_id",),
)

ITEM_LABELLER_QUALITY = TableSpec(
    "item_labeller_quality",
    "Image-level accuracy per labeller with a 90% Jeffreys interval (against gold where there is gold).",
    {
        "labeller_id": _ids("Labeller."),
        "n_labels": Col("int64", "Answers given."),
        "accuracy": Col(float, "Accuracy estimate; NaN = nothing to score against.", True, _UNIT_OR_NAN),
        "accuracy_basis": Col(ID, "gold | consensus: what the accuracy is measured against."),
    },
    ("labeller_id",),
)

ITEM_CONFUSION = TableSpec(
    "item_confusion",
    "Dawid-Skene confusion matrix per labeller, long form.",
    {
        "labeller_id": _ids("Labeller."),
        "true_label": _ids("True class."),
        "given_label": _ids("Class the labeller gives."),
        "probability": Col(float, "P(given | true) for this labeller.", checks=_UNIT),
    },
    ("labeller_id", "true_label", "given_label"),
)
