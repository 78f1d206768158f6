"""Carried rows in ``write_table``: rows taken over from a previous file keep their geometry as written
(WKB, bbox), and the file is byte for byte the one written from decoded geometries."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
from shapely.geometry import MultiPolygon, box

from schemas.tables import SchemaViolation
from tasks.store.artifacts import CARRIED, read_carried, read_table, write_table

CRS = ("EPSG:32630", "EPSG:32631")


def _issues(n: int, seed: int) -> pd.DataFrame:
    """A label_issues frame over two CRSs, polygons and multipolygons, some nullable values missing."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1e5, n)
    geoms = [
        box(v, v, v + 10, v + 5)
        if i % 3
        else MultiPolygon([box(v, v, v + 1, v + 1), box(v + 2, v, v + 3, v + 1)])
        for i, v in enumerate(x)
    ]
    sites = [f"s{i % 7:02d}" for i in range(n)]
    df = pd.DataFrame(
        {
            "issue_id": [f"{s}/lab{i % 3}/{i:04d}" for i, s in enumerate(sites)],
            "site_id": sites,
            "labeller_id": [f"lab{i % 3}" for i in range(n)],
            "kind": rng.choice(["missed_field", "spurious_field", "boundary"], n),
            "rank": 0,
            "score": rng.uniform(0, 5, n),
            "area_m2": rng.uniform(1, 100, n),
            "n_pixels": rng.integers(1, 50, n).astype(np.int64),
            "mean_p_field": rng.uniform(0, 1, n),
            "consensus_agreement": np.where(rng.uniform(size=n) < 0.3, np.nan, rng.uniform(0, 1, n)),
            "labeller_polygon_id": [None if i % 4 == 0 else f"p{i}" for i in range(n)],
            "evidence": [f'{{"i": {i}}}' for i in range(n)],
            "crs": [CRS[int(s[-1]) % 2] for s in sites],
            "geometry": geoms,
        }
    )
    return _ranked(df)


def _ranked(df: pd.DataFrame) -> pd.DataFrame:
    df = df.sort_values(["score", "issue_id"], ascending=[False, True]).reset_index(drop=True)
    return df.assign(rank=np.arange(1, len(df) + 1, dtype=np.int64))


def _carry(tmp_path, full: pd.DataFrame, changed_sites: set[str]):
    """Previous version = ``full`` with other scores on the changed sites; then the reprocess path: carry
    the unchanged sites' rows, take the changed sites' rows fresh, rank all."""
    prev = full.copy()
    is_changed = prev["site_id"].isin(changed_sites)
    prev.loc[is_changed, "score"] = prev.loc[is_changed, "score"] * 0.5
    prev = _ranked(prev)
    write_table("label_issues", prev, tmp_path / "prev")
    drop = [("site_id", "not in", sorted(changed_sites))] if changed_sites else None
    kept, carried = read_carried(tmp_path / "prev", filters=drop)
    fresh = full[full["site_id"].isin(changed_sites)].assign(**{CARRIED: -1})
    both = _ranked(pd.concat([fresh, kept[fresh.columns]], ignore_index=True))
    return both, carried


def test_carried_rows_write_the_same_file(tmp_path):
    full = _issues(600, 0)
    both, carried = _carry(tmp_path, full, {"s02", "s05"})
    rec = write_table("label_issues", both, tmp_path / "carried", carried, changed=["rank"])
    ref = write_table("label_issues", full, tmp_path / "full")
    for part in sorted((tmp_path / "full").glob("*.parquet")):
        assert (tmp_path / "carried" / part.name).read_bytes() == part.read_bytes(), part.name
    assert {k: v for k, v in rec.items() if k != "path"} == {k: v for k, v in ref.items() if k != "path"}
    pd.testing.assert_frame_equal(read_table(tmp_path / "carried"), read_table(tmp_path / "full"))


def test_all_rows_carried_and_a_crs_without_fresh_rows(tmp_path):
    full = _issues(300, 1)
    # only sites of one CRS change: the other CRS part is carried whole; then nothing changes at all
    for changed in ({"s01", "s03"}, set()):
        both, carried = _carry(tmp_path, full, changed)
        write_table("label_issues", both, tmp_path / "carried", carried, changed=["rank"])
        write_table("label_issues", full, tmp_path / "full")
        for part in sorted((tmp_path / "full").glob("*.parquet")):
            assert (tmp_path / "carried" / part.name).read_bytes() == part.read_bytes(), part.name


def test_carried_rows_are_checked(tmp_path):
    full = _issues(200, 2)
    both, carried = _carry(tmp_path, full, {"s02"})
    bad_rank = both.assign(rank=both["rank"] - 1)  # a carried row with rank 0
    with pytest.raises(SchemaViolation, match="rank"):
        write_table("label_issues", bad_rank, tmp_path / "out", carried, changed=["rank"])
    dup = pd.concat([both, both[both[CARRIED] >= 0].head(1)], ignore_index=True)
    with pytest.raises(SchemaViolation, match="issue_id"):
        write_table("label_issues", dup, tmp_path / "out", carried, changed=["rank"])
    bad_fresh = both.copy()
    bad_fresh.loc[bad_fresh[CARRIED] < 0, "geometry"] = shapely.Polygon()  # fresh rows: full validation
    with pytest.raises(SchemaViolation, match="empty geometry"):
        write_table("label_issues", bad_fresh, tmp_path / "out", carried, changed=["rank"])
    stray = both.copy()
    stray.loc[stray[CARRIED] >= 0, CARRIED] += 10_000  # a locator past the carried rows
    with pytest.raises(ValueError, match="carried rows"):
        write_table("label_issues", stray, tmp_path / "out", carried, changed=["rank"])


def test_read_carried_refuses_a_layout_it_cannot_copy(tmp_path):
    """A part without the bbox covering (or not WKB) cannot be copied as write_table writes it: a
    ValueError, on which a stage reads the rows decoded instead."""
    full = _issues(50, 3)
    part = gpd.GeoDataFrame(full.drop(columns="crs"), geometry="geometry", crs=CRS[0])
    (tmp_path / "t").mkdir()
    part.to_parquet(tmp_path / "t" / "part-x.parquet", index=False, schema_version="1.1.0")
    with pytest.raises(ValueError, match="bbox"):
        read_carried(tmp_path / "t")
