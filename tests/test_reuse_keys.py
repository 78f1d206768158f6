"""Content keys per unit: the vectorised ``group_keys`` equals the per-group definition it replaces."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.store.reuse import content_key, frame_bytes, group_keys, site_label_keys


def _per_group(df, by, columns, sort_by=()):
    ordered = df.sort_values([by, *sort_by], kind="stable") if sort_by else df
    return {
        str(u): content_key(list(columns), frame_bytes(g[list(columns)]))
        for u, g in ordered.groupby(by, sort=False)
    }


_rows = st.lists(
    st.tuples(
        st.sampled_from(["S1", "S2", "S10", "T0000"]),
        st.integers(0, 5),
        st.one_of(st.none(), st.text("ab\x1f", max_size=3)),
        st.floats(allow_nan=True, allow_infinity=False, width=32),
        st.integers(0, 3),
    ),
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(_rows)
def test_group_keys_equals_one_frame_per_group(rows):
    df = pd.DataFrame(rows, columns=["site_id", "n", "text", "x", "g"])
    df["geometry"] = [shapely.box(0, 0, 1 + g, 1) if g else None for g in df["g"]]
    cols = ["n", "text", "x", "geometry"]
    assert group_keys(df, "site_id", cols, sort_by=["n"]) == _per_group(df, "site_id", cols, ["n"])
    assert group_keys(df, "site_id", cols) == _per_group(df, "site_id", cols)


def test_group_keys_with_array_dependent_text_falls_back_per_group():
    # pandas formats a datetime column with one format per array: midnight-only arrays drop the time
    df = pd.DataFrame(
        {
            "site_id": ["a", "a", "b"],
            "t": pd.to_datetime(["2024-01-01", "2024-01-02", "2024-01-03T12:00"], format="ISO8601"),
        }
    )
    assert group_keys(df, "site_id", ["t"]) == _per_group(df, "site_id", ["t"])


def test_group_keys_drop_rows_without_a_group_and_tell_groups_apart():
    df = pd.DataFrame({"site_id": ["a", None, "b", "a"], "v": [1, 2, 1, 1]})
    keys = group_keys(df, "site_id", ["v"])
    assert set(keys) == {"a", "b"}
    assert keys["a"] != keys["b"]  # two rows vs one row of the same value


def test_site_label_keys_change_with_one_polygon_only():
    assignments = pd.DataFrame(
        {
            "site_id": ["s1", "s1", "s2"],
            "labeller_id": ["L1", "L2", "L1"],
            "status": ["completed"] * 3,
            "completed_at": pd.to_datetime(["2024-01-01", "2024-01-02", None], utc=True),
            "is_reference": [False, False, False],
        }
    )
    labels = gpd.GeoDataFrame(
        {
            "site_id": ["s1", "s2"],
            "polygon_id": ["p1", "p2"],
            "labeller_id": ["L1", "L1"],
            "label": ["field", None],
        },
        geometry=[shapely.box(0, 0, 1, 1), shapely.box(0, 0, 2, 2)],
    )
    before = site_label_keys(labels, assignments)
    moved = labels.copy()
    moved.loc[1, "geometry"] = shapely.box(0, 0, 2, 2.5)
    after = site_label_keys(moved, assignments)
    assert before["s1"] == after["s1"] and before["s2"] != after["s2"]
    assert set(site_label_keys(labels.iloc[:0], assignments)) == {"s1", "s2"}  # "no fields" still keyed
    np.testing.assert_equal(len(before), 2)
