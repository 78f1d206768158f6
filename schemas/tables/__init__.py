"""The one definition of every table: columns, dtypes, checks and what each column means.

Stages validate what they write with :func:`validate`; README's table reference is generated from
the same specs (``python -m schemas.docs``), so the docs cannot drift from the code. One module per
stage that writes the tables; ``core`` holds the building blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import pandera.pandas as pa

from schemas.tables.consensus import (
    ASSIGNMENT_QUALITY,
    CONSENSUS_LABELS,
    CONSENSUS_PATTERN_COUNTS,
    ITEM_CONFUSION,
    ITEM_CONSENSUS,
    ITEM_LABELLER_QUALITY,
    LABELLER_QUALITY,
    SITE_CONSENSUS,
)
from schemas.tables.core import ID, ROLES, STATUSES, Col, TableSpec
from schemas.tables.inputs import ASSIGNMENTS, ITEM_LABELS, LABELS, SITES, TILES
from schemas.tables.learn import (
    ASSIGNMENT_ISSUES,
    ISSUE_KINDS,
    LABEL_ISSUE_STATS,
    LABEL_ISSUES,
    PSEUDO_LABEL_THRESHOLDS,
    PSEUDO_LABELS,
)
from schemas.tables.operations import REUSE_KEYS

__all__ = [
    "ID",
    "ISSUE_KINDS",
    "ROLES",
    "STATUSES",
    "TABLES",
    "Col",
    "SchemaViolation",
    "TableSpec",
    "validate",
]

TABLES: dict[str, TableSpec] = {
    t.name: t
    for t in (
        SITES, TILES, LABELS, ASSIGNMENTS, ITEM_LABELS,
        ASSIGNMENT_QUALITY, LABELLER_QUALITY, SITE_CONSENSUS, CONSENSUS_LABELS, CONSENSUS_PATTERN_COUNTS,
        ITEM_CONSENSUS, ITEM_LABELLER_QUALITY, ITEM_CONFUSION,
        LABEL_ISSUES, ASSIGNMENT_ISSUES, LABEL_ISSUE_STATS,
        PSEUDO_LABELS, PSEUDO_LABEL_THRESHOLDS,
        REUSE_KEYS,
    )
}  # fmt: skip


class SchemaViolation(ValueError):
    """A table does not match its declared schema; the message names table, column, row and check."""


def validate(name: str, df: pd.DataFrame, later: Sequence[str] = ()) -> pd.DataFrame:
    """Validate ``df`` against table ``name``; raise :class:`SchemaViolation` listing the first failures.
    ``later``: columns filled in after ``df`` was made (e.g. global ranks), checked when they are."""
    spec = TABLES[name]
    missing = [c for c in spec.columns if c not in df.columns and c not in later]
    if missing:
        raise SchemaViolation(f"table {name!r}: missing columns {missing}")
    schema = spec.pandera()
    if later:
        schema = schema.remove_columns([c for c in later if c in schema.columns])
    try:
        schema.validate(df, lazy=True)
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


def validate_columns(name: str, df: pd.DataFrame, columns: Sequence[str]) -> None:
    """``validate`` restricted to ``columns`` and the table's key (unique over all of ``df``): for columns
    added to rows whose others were validated before."""
    schema = TABLES[name].pandera()
    sub = pa.DataFrameSchema(
        {c: schema.columns[c] for c in columns}, unique=schema.unique, strict=False, name=name
    )
    try:
        sub.validate(df, lazy=True)
    except pa.errors.SchemaErrors as exc:
        lines = [
            f"column {r.column!r} row {r.index}: {r.check} (value {r.failure_case!r})"
            for r in exc.failure_cases.head(5).itertuples()
        ]
        raise SchemaViolation(f"table {name!r} fails its schema:\n  " + "\n  ".join(lines)) from None
