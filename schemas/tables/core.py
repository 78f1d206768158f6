"""Building blocks of the table specs: column and table declarations, shared checks."""

from __future__ import annotations

from dataclasses import dataclass, field

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

_UNIT = _FRACTION
_UNIT_OR_NAN = (pa.Check(lambda s: s.isna() | s.between(0.0, 1.0), error="outside [0, 1]"),)
