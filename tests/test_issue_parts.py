"""``label_issues`` written in pieces (tasks/learn/issue_parts.py, tasks/store/sorted_parts.py): staged
batches and a previous version's rows merged by site into one part per CRS, a row group at a time; the
file is byte for byte the one written when every row is staged fresh."""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shapely.geometry import MultiPolygon, Polygon, box

import tasks.store.sorted_parts as sorted_parts
from schemas.tables import SchemaViolation
from tasks.learn.issue_parts import LIGHT, SORT, extent, part_schema, read_previous, stage_rows, write_parts
from tasks.store.artifacts import file_hash, geo_table, read_table
from tasks.store.sorted_parts import GeoExtent, SortedPartWriter, is_streamable, merge_sorted

CRS = ("EPSG:32630", "EPSG:32631")


@pytest.fixture(autouse=True)
def small_row_groups(monkeypatch):
    """Parts of a few hundred rows span several row groups."""
    monkeypatch.setattr(sorted_parts, "ROW_GROUP_ROWS", 64)


def _issues(n: int, seed: int) -> pd.DataFrame:
    """Scored label_issues rows (no rank) over two CRSs and 9 sites, polygons and multipolygons, some
    nullable values missing."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1e5, n)
    geoms = [
        box(v, v, v + 10, v + 5)
        if i % 3
        else MultiPolygon([box(v, v, v + 1, v + 1), box(v + 2, v, v + 3, v + 1)])
        for i, v in enumerate(x)
    ]
    sites = [f"s{i % 9:02d}" for i in range(n)]
    return pd.DataFrame(
        {
            "issue_id": [f"{s}/lab{i % 3}/{i:04d}" for i, s in enumerate(sites)],
            "site_id": sites,
            "labeller_id": [f"lab{i % 3}" for i in range(n)],
            "kind": rng.choice(["missed_field", "spurious_field", "boundary"], n),
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


def _write(folder, staging, df, batches, previous=None):
    """Stage ``df``'s rows in batches of sites (batch order shuffled), then write the parts."""
    staging.mkdir(parents=True, exist_ok=True)
    staged = [stage_rows(df[df["site_id"].isin(b)], staging, k) for k, b in enumerate(batches)]
    lights = [s.light for s in staged] + ([previous.light] if previous is not None else [])
    light = pd.concat([x for x in lights if len(x)], ignore_index=True)
    return write_parts(folder, light, staged, previous)


def test_staged_and_previous_rows_write_the_file_a_fresh_write_does(tmp_path):
    full = _issues(700, 1)
    sites = sorted(set(full["site_id"]))
    rec = _write(tmp_path / "full", tmp_path / "st1", full, [sites[5:], sites[:2], sites[2:5]])
    # the previous version: other scores on the changed sites; the new one takes the rest over from it
    changed = {"s01", "s06", "s07"}
    prev = full.assign(score=np.where(full["site_id"].isin(changed), full["score"] * 0.5, full["score"]))
    _write(tmp_path / "prev", tmp_path / "st2", prev, [sites])
    kept = [s for s in sites if s not in changed]
    previous = read_previous(tmp_path / "prev", kept)
    assert set(previous.light["site_id"]) == set(kept) and previous.unusable == set()
    new = full[full["site_id"].isin(changed)]
    rec2 = _write(tmp_path / "inc", tmp_path / "st3", new, [["s06", "s07"], ["s01"]], previous)
    assert rec2["checksum"] == rec["checksum"] and rec2["rows"] == rec["rows"] == len(full)
    for part in sorted((tmp_path / "full").glob("*.parquet")):
        assert file_hash(part) == file_hash(tmp_path / "inc" / part.name)

    # the rows, their ranks (score descending, ties by the ids) and the parts' layout
    got = read_table(tmp_path / "full")
    want = full.sort_values(["score", "site_id", "labeller_id", "issue_id"], ascending=[False, 1, 1, 1])
    want = want.assign(rank=np.arange(1, len(full) + 1, dtype=np.int64))
    got, want = (d.sort_values("issue_id").reset_index(drop=True) for d in (got, want))
    assert [g.wkb for g in got["geometry"]] == [g.wkb for g in want["geometry"]]
    cols = [c for c in want.columns if c != "geometry"]
    pd.testing.assert_frame_equal(got[cols], want[cols], check_dtype=False)
    for crs in CRS:
        part = tmp_path / "full" / f"part-{crs.replace(':', '_')}.parquet"
        meta = pq.read_metadata(part)
        assert meta.num_row_groups > 2 and is_streamable(part, SORT)
        rows = pq.read_table(part).to_pandas()
        assert rows[SORT].equals(rows[SORT].sort_values(SORT).reset_index(drop=True))
        # geopandas' own metadata for the same rows: bbox and geometry types
        mine = json.loads(pq.read_schema(part).metadata[b"geo"])["columns"]["geometry"]
        ref_path = tmp_path / f"ref-{crs.replace(':', '_')}.parquet"
        gpd.read_parquet(part).to_parquet(ref_path, schema_version="1.1.0", write_covering_bbox=True)
        ref = json.loads(pq.read_schema(ref_path).metadata[b"geo"])["columns"]["geometry"]
        assert mine["bbox"] == ref["bbox"] and mine["geometry_types"] == ref["geometry_types"]


def test_a_part_in_another_layout_is_not_streamed(tmp_path):
    full = _issues(200, 2)
    _write(tmp_path / "prev", tmp_path / "st", full, [sorted(set(full["site_id"]))])
    part = sorted((tmp_path / "prev").glob("*.parquet"))[0]
    gpd.read_parquet(part).to_parquet(part, schema_version="1.1.0", write_covering_bbox=True)
    assert not is_streamable(part, SORT)
    previous = read_previous(tmp_path / "prev", sorted(set(full["site_id"])))
    in_part = set(gpd.read_parquet(part)["site_id"])
    assert previous.unusable == in_part and not set(previous.light["site_id"]) & in_part


def test_bad_rows_are_refused(tmp_path):
    full = _issues(60, 3)
    bad = full.copy()
    bad.loc[3, "geometry"] = Polygon()
    with pytest.raises(SchemaViolation, match="empty geometry"):
        stage_rows(bad, tmp_path, 0)
    bad = full.copy()
    bad.loc[5, "mean_p_field"] = 1.5
    with pytest.raises(SchemaViolation, match="mean_p_field"):
        stage_rows(bad, tmp_path, 0)
    # the same issue in two batches: the key is checked over all rows
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    twice = [stage_rows(full, tmp_path / "a", 0), stage_rows(full.head(1), tmp_path / "b", 1)]
    light = pd.concat([s.light for s in twice], ignore_index=True)
    with pytest.raises(SchemaViolation, match="issue_id"):
        write_parts(tmp_path / "out", light, twice, None)


def test_no_rows_write_an_empty_table(tmp_path):
    rec = write_parts(tmp_path / "out", pd.DataFrame(columns=LIGHT), [], None)
    assert rec["rows"] == 0 and len(read_table(tmp_path / "out")) == 0


def _stream(keys, sizes):
    out, at = [], 0
    for n in sizes:
        part = keys[at : at + n]
        out.append(pa.table({"k": pa.array(part, pa.string()), "v": list(range(at, at + len(part)))}))
        at += len(part)
    assert at == len(keys)
    return iter(out)


def test_merge_interleaves_sorted_streams_by_key():
    rng = np.random.default_rng(4)
    keys = [f"k{i:03d}" for i in range(300)]
    owner = rng.integers(0, 3, len(keys))
    streams = []
    for s in range(3):
        mine = [k for k, o in zip(keys, owner, strict=True) for _ in range(1 + int(k[-1]) % 3) if o == s]
        streams.append(_stream(mine, rng.integers(1, 40, 200).tolist()))
    merged = pa.concat_tables(list(merge_sorted(streams, "k")))
    assert merged["k"].to_pylist() == sorted(merged["k"].to_pylist())
    assert set(merged["k"].to_pylist()) == set(keys)
    with pytest.raises(ValueError, match="in two"):
        list(merge_sorted([_stream(["a", "b"], [2]), _stream(["b", "c"], [2])], "k"))
    with pytest.raises(ValueError, match="not sorted"):
        list(merge_sorted([_stream(["a", "c"], [1, 1]), _stream(["b", "a"], [2])], "k"))


def test_writer_refuses_rows_outside_the_announced_extent(tmp_path):
    df = _issues(30, 5)
    df = df[df["crs"] == CRS[0]].drop(columns="crs").assign(rank=np.int64(1))
    table = geo_table(gpd.GeoDataFrame(df, geometry="geometry", crs=CRS[0]), CRS[0])
    announced = GeoExtent.of(table.slice(0, 3))
    writer = SortedPartWriter(tmp_path / "p.parquet", part_schema(CRS[0]), SORT, announced)
    writer.write(table)
    with pytest.raises(ValueError, match="announced"):
        writer.close()
    assert not (tmp_path / "p.parquet").exists()
    assert extent(stage_rows(_issues(30, 5), tmp_path, 0).light) == GeoExtent.of(
        pa.concat_tables(pq.read_table(p) for p in sorted(tmp_path.glob("00000-*.parquet")))
    )
