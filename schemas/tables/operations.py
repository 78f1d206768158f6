"""Tables of the operations layer: what incremental reprocessing keys each per-site result by."""

from __future__ import annotations

import pandera.pandas as pa

from schemas.tables.core import Col, TableSpec, _ids

REUSE_KEYS = TableSpec(
    "reuse_keys",
    "Per stage and unit (a site, or a site and scene): the content key of exactly the inputs, global "
    "values, parameters and code its results were computed from. A later version reuses a unit's results "
    "when its key is unchanged.",
    {
        "stage": _ids(
            "Stage that computed the unit (ingest, consensus, train, pseudo_labels, label_issues)."
        ),
        "unit_id": _ids("The unit: a site id, or site id and scene id joined by '/'."),
        "key": Col("id", "BLAKE2b-128 hex of the unit's inputs.", checks=(pa.Check.str_length(32, 32),)),
        "computed_in": _ids("Version id that computed the result (earlier than this one when reused)."),
    },
    ("stage", "unit_id"),
)
