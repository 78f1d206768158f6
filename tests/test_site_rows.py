"""Per-batch streamed reads (tasks/store/site_rows.py) return what a Parquet-filtered read returns,
reading only the row groups that can hold the batch's sites."""

from __future__ import annotations

import pandas as pd
import pytest
import shapely

import tasks.store.site_rows as site_rows
from tasks.store.artifacts import read_table, write_table
from tasks.store.site_rows import read_site_rows


@pytest.fixture
def labels_dir(tmp_path, monkeypatch):
    """A labels folder with two CRS parts, streamed in record batches smaller than a part."""
    monkeypatch.setattr(site_rows, "STREAM_ROWS", 7)
    rows = []
    for i in range(60):
        site, crs = f"S{i % 12:03d}", "EPSG:32630" if i % 12 < 8 else "EPSG:32631"
        x = 500_000 + 10 * i
        rows.append(
            {
                "polygon_id": f"{site}/lab{i % 3}/{i}",
                "site_id": site,
                "labeller_id": f"lab{i % 3}",
                "label": None if i % 5 == 0 else "crop",
                "area_m2": 25.0 + i,
                "was_valid": bool(i % 2),
                "repair_note": None,
                "geometry": shapely.box(x, 4_000_000, x + 5, 4_000_005 + i),
                "crs": crs,
            }
        )
    write_table("labels", pd.DataFrame(rows), tmp_path / "labels")
    assert len(list((tmp_path / "labels").glob("*.parquet"))) == 2
    return tmp_path / "labels"


@pytest.mark.parametrize(
    "site_ids",
    [["S000", "S003", "S009", "S011"], ["S010"], ["S001", "S002", "S004", "S005", "S006"], ["nope"]],
)
def test_read_site_rows_equals_filtered_read(labels_dir, site_ids):
    got = read_site_rows(labels_dir, site_ids)
    want = read_table(labels_dir, filters=[("site_id", "in", site_ids)])
    pd.testing.assert_frame_equal(got, want)
    assert set(got["site_id"]) == set(site_ids) - {"nope"}
    assert "bbox" not in got.columns  # the GeoParquet covering column stays out, as in read_table
    columns = ["polygon_id", "labeller_id", "geometry"]  # what label_issues' batches read
    few = read_site_rows(labels_dir, site_ids, columns)
    assert list(few.columns) == [*columns, "crs"]
    pd.testing.assert_frame_equal(few, got[[*columns, "crs"]])


def test_only_row_groups_that_can_hold_the_sites_are_read(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    import tasks.store.artifacts as artifacts

    monkeypatch.setattr(artifacts, "ROW_GROUP_ROWS", 10)
    rows = [
        {
            "polygon_id": f"S{i // 5:03d}/a/{i}", "site_id": f"S{i // 5:03d}", "labeller_id": "a",
            "label": "crop", "area_m2": 1.0, "was_valid": True, "repair_note": None,
            "geometry": shapely.box(i, 0, i + 1, 1), "crs": "EPSG:32630",
        }
        for i in range(50)
    ]  # fmt: skip
    write_table("labels", pd.DataFrame(rows), tmp_path / "labels")
    (part,) = (tmp_path / "labels").glob("*.parquet")
    pf = pq.ParquetFile(part)
    assert pf.metadata.num_row_groups == 5
    assert site_rows._row_groups(pf, ["S004", "S005"]) == [2]
    assert site_rows._row_groups(pf, ["S000", "S009"]) == [0, 4]
    assert site_rows._row_groups(pf, ["nope"]) == []
    got = read_site_rows(tmp_path / "labels", ["S004", "S009"])
    assert sorted(set(got["site_id"])) == ["S004", "S009"] and len(got) == 10
