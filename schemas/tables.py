"""The one definition of every table: columns, dtypes, checks and what each column means.

Stages validate what they write with :func:`validate`; README's table reference is generated from
the same specs (``python -m schemas.docs``), so the docs cannot drift from the code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import pandera.pandas as pa

ID = "id"  # text of any string dtype (object, str, string[pyarrow]); pandas 3 and geopandas differ
_IS_TEXT = pa.Check(
    lambda s: s.map(lambda v: isinstance(v, str)),
    element_wise=False,
    ignore_na=True,
    error="value is not text",
)
ROLES = ("gold", "multi", "single", "unlabelled")
STATUSES = ("completed", "pending")


@dataclass(frozen=True)
class Col:
    dtype: object
    description: str
    nullable: bool = False
    checks: tuple = ()


@dataclass(frozen=True)
class TableSpec:
    name: str
    description: str
    columns: dict[str, Col]
    primary_key: tuple[str, ...]
    geometry: bool = False
    geometry_crs: str | None = None  # fixed CRS of the geometry column; None = the native CRS of the part
    extra: dict = field(default_factory=dict)

    def pandera(self) -> pa.DataFrameSchema:
        cols = {
            name: pa.Column(
                None if c.dtype == ID else c.dtype,
                checks=list(c.checks) + ([_IS_TEXT] if c.dtype == ID else []),
                nullable=c.nullable,
                coerce=False,
                description=c.description,
            )
            for name, c in self.columns.items()
            if name != "geometry"
        }
        return pa.DataFrameSchema(cols, unique=list(self.primary_key) or None, strict=False, name=self.name)


def _ids(desc: str) -> Col:
    return Col(ID, desc, checks=(pa.Check.str_length(min_value=1),))


_FRACTION = (pa.Check.in_range(0.0, 1.0),)

SITES = TableSpec(
    "sites",
    "One row per labelling site: its footprint, the scene grid it uses, and its role in the campaign.",
    {
        "site_id": _ids("Site identifier."),
        "scene_id": Col(ID, "Scene whose pixel grid the site uses (the one with most valid pixels)."),
        "crs": Col(ID, "Native projected CRS of the site grid, e.g. EPSG:32630."),
        "transform": Col(object, "Affine transform of the site grid (a, b, c, d, e, f)."),
        "width": Col("int64", "Grid width in pixels.", checks=(pa.Check.gt(0),)),
        "height": Col("int64", "Grid height in pixels.", checks=(pa.Check.gt(0),)),
        "role": Col(
            ID,
            "gold | multi | single | unlabelled, derived from assignments.",
            checks=(pa.Check.isin(ROLES),),
        ),
        "n_labellers": Col("int64", "Completed non-reference assignments.", checks=(pa.Check.ge(0),)),
        "has_reference": Col(bool, "A reference (expert) labeller completed this site."),
        "geometry": Col(object, "Footprint, EPSG:4326."),
    },
    ("site_id",),
    geometry=True,
    geometry_crs="EPSG:4326",
)

TILES = TableSpec(
    "tiles",
    "One row per site tile per scene: band statistics, nodata and cloud shares, content hash.",
    {
        "site_id": _ids("Site identifier."),
        "scene_id": _ids("Scene file stem the pixels come from."),
        "crs": Col(ID, "Native CRS of the scene."),
        "transform": Col(object, "Affine transform of the tile window (a, b, c, d, e, f)."),
        "width": Col("int64", "Tile width in pixels."),
        "height": Col("int64", "Tile height in pixels."),
        "band_names": Col(object, "Band names in order (B, G, R, NIR for the demo)."),
        "mean": Col(object, "Per-band mean of valid pixels (NaN when no pixel is valid)."),
        "std": Col(object, "Per-band standard deviation of valid pixels."),
        "p02": Col(object, "Per-band 2nd percentile of valid pixels."),
        "p50": Col(object, "Per-band median of valid pixels."),
        "p98": Col(object, "Per-band 98th percentile of valid pixels."),
        "valid_fraction": Col(float, "Share of pixels neither nodata nor cloud.", checks=_FRACTION),
        "nodata_fraction": Col(float, "Share of pixels that are nodata in any band.", checks=_FRACTION),
        "cloud_fraction": Col(
            float, "Share of bright (cloud-like) pixels among data pixels.", checks=_FRACTION
        ),
        "content_hash": Col(ID, "BLAKE2b of the tile's pixel bytes: changes iff the pixels change."),
        "geometry": Col(object, "Tile footprint, EPSG:4326."),
    },
    ("site_id", "scene_id"),
    geometry=True,
    geometry_crs="EPSG:4326",
)

LABELS = TableSpec(
    "labels",
    "Normalised label polygons, clipped to their site, in the site's native CRS (one part per CRS).",
    {
        "polygon_id": _ids("Stable id: site_id/labeller_id/ordinal within the assignment."),
        "site_id": _ids("Site identifier."),
        "labeller_id": _ids("Labeller identifier."),
        "label": Col(ID, "Polygon class; null for an unclassed field.", nullable=True),
        "area_m2": Col(float, "Polygon area in square metres (native CRS).", checks=(pa.Check.gt(0),)),
        "was_valid": Col(bool, "The input geometry was valid as drawn."),
        "repair_note": Col(ID, "What make_valid / clipping changed; null when nothing.", nullable=True),
        "geometry": Col(object, "Polygon in the site's native CRS."),
    },
    ("polygon_id",),
    geometry=True,
)

ASSIGNMENTS = TableSpec(
    "assignments",
    "Who was asked to label which site, and whether they finished. Completed with 0 polygons = no fields.",
    {
        "site_id": _ids("Site identifier."),
        "labeller_id": _ids("Labeller identifier."),
        "completed_at": Col(
            "datetime64[us, UTC]", "When the assignment was submitted; null = pending.", True
        ),
        "status": Col(ID, "completed | pending.", checks=(pa.Check.isin(STATUSES),)),
        "n_polygons": Col(
            "int64", "Polygons in the labels table for this assignment.", checks=(pa.Check.ge(0),)
        ),
        "is_reference": Col(bool, "The labeller is a reference (expert) labeller."),
    },
    ("site_id", "labeller_id"),
)

ITEM_LABELS = TableSpec(
    "item_labels",
    "Image-level class labels, one per item per labeller.",
    {
        "item_id": _ids("Item identifier (the site id for site-level land cover)."),
        "labeller_id": _ids("Labeller identifier."),
        "label": _ids("Class given."),
        "is_reference": Col(bool, "The labeller is a reference (expert) labeller."),
    },
    ("item_id", "labeller_id"),
)

_UNIT = (pa.Check.in_range(0.0, 1.0),)
_UNIT_OR_NAN = (pa.Check(lambda s: s.isna() | s.between(0.0, 1.0), error="outside [0, 1]"),)

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
    "Consensus field polygons vectorised from the posterior label map, native CRS (one part per CRS).",
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

ISSUE_KINDS = (
    "missed_field", "spurious_field", "boundary", "model_only", "empty_assignment", "possible_spammer",
)  # fmt: skip

LABEL_ISSUES = TableSpec(
    "label_issues",
    "Pixel confident-learning issues of crowd assignments as regions, ranked over the dataset "
    "(docs/label_issues.md); native CRS, one part per CRS.",
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

PSEUDO_LABELS = TableSpec(
    "pseudo_labels",
    "Model field polygons on unlabelled sites (and second opinions on single-labeller sites), with "
    "confidence and whether they pass their class threshold (docs/learn.md); native CRS, one part per CRS.",
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

TABLES: dict[str, TableSpec] = {
    t.name: t
    for t in (
        SITES, TILES, LABELS, ASSIGNMENTS, ITEM_LABELS,
        ASSIGNMENT_QUALITY, LABELLER_QUALITY, SITE_CONSENSUS, CONSENSUS_LABELS,
        ITEM_CONSENSUS, ITEM_LABELLER_QUALITY, ITEM_CONFUSION,
        LABEL_ISSUES, ASSIGNMENT_ISSUES,
        PSEUDO_LABELS, PSEUDO_LABEL_THRESHOLDS,
    )
}  # fmt: skip


class SchemaViolation(ValueError):
    """A table does not match its declared schema; the message names table, column, row and check."""


def validate(name: str, df: pd.DataFrame) -> pd.DataFrame:
    """Validate ``df`` against table ``name``; raise :class:`SchemaViolation` listing the first failures."""
    spec = TABLES[name]
    missing = [c for c in spec.columns if c not in df.columns]
    if missing:
        raise SchemaViolation(f"table {name!r}: missing columns {missing}")
    try:
        spec.pandera().validate(df, lazy=True)
    except pa.errors.SchemaErrors as exc:
        fc = exc.failure_cases.head(5)
        lines = [
            f"column {r.column!r} row {r.index}: {r.check} (value {r.failure_case!r})"
            for r in fc.itertuples()
        ]
        raise SchemaViolation(f"table {name!r} fails its schema:\n  " + "\n  ".join(lines)) from None
    if spec.geometry:
        geom = df.geometry
        bad = geom.isna() | geom.is_empty
        if bad.any():
            raise SchemaViolation(f"table {name!r} row {df.index[bad.to_numpy()][0]}: empty geometry")
        if spec.geometry_crs and (df.crs is None or df.crs.to_string() != spec.geometry_crs):
            raise SchemaViolation(f"table {name!r}: geometry CRS must be {spec.geometry_crs}, got {df.crs}")
    return df
