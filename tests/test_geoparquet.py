"""Our GeoParquet reader builds the frame geopandas builds, with each CRS parsed once per process."""

from __future__ import annotations

import json

import geopandas as gpd
import pyarrow.parquet as pq
import pytest
import shapely

from tasks.store.geoparquet import geo_frame, parsed_crs, read_geoparquet


def _frame(crs, n=50):
    return gpd.GeoDataFrame(
        {
            "site_id": [f"S{i % 7:05d}" for i in range(n)],
            "n": range(n),
            "label": [None if i % 5 == 0 else "crop" for i in range(n)],
        },
        geometry=[shapely.box(i, i, i + 1.5, i + 2) for i in range(n)],
        crs=crs,
    )


@pytest.mark.parametrize("crs", ["EPSG:32630", "EPSG:4326", None])
@pytest.mark.parametrize("covering", [True, False])
def test_read_equals_geopandas(tmp_path, crs, covering):
    path = tmp_path / "t.parquet"
    _frame(crs).to_parquet(path, schema_version="1.1.0", write_covering_bbox=covering, index=False)
    cases = [{}, {"filters": [("site_id", "in", ["S00001", "S00003"])]}, {"columns": ["n", "geometry"]}]
    for kw in cases:
        ours, theirs = read_geoparquet(path, **kw), gpd.read_parquet(path, **kw)
        assert list(ours.columns) == list(theirs.columns) and "bbox" not in ours
        assert ours.equals(theirs) and (ours.dtypes == theirs.dtypes).all()
        assert ours.crs == theirs.crs and ours.geometry.name == theirs.geometry.name
    with pytest.raises(ValueError, match="No geometry columns"):
        read_geoparquet(path, columns=["n"])


def test_missing_crs_means_crs84_and_one_object_per_crs(tmp_path):
    path = tmp_path / "t.parquet"
    _frame("EPSG:4326").to_parquet(path, schema_version="1.1.0", index=False)
    table = pq.read_table(path)
    geo = json.loads(table.schema.metadata[b"geo"])
    del geo["columns"]["geometry"]["crs"]
    bare = table.replace_schema_metadata({**table.schema.metadata, b"geo": json.dumps(geo).encode()})
    assert geo_frame(bare).crs == gpd.read_parquet(path).crs.__class__.from_user_input("OGC:CRS84")
    crs = json.loads(pq.read_schema(path).metadata[b"geo"])["columns"]["geometry"]["crs"]
    assert parsed_crs(crs) is parsed_crs(json.loads(json.dumps(crs))) and parsed_crs(None) is None
    assert read_geoparquet(path).crs is read_geoparquet(path).crs


# ------------------------------------------------------------------------ how every writer spells a CRS
@pytest.mark.parametrize("crs", ["EPSG:32630", "EPSG:4326"])
def test_crs_definition_is_a_fresh_processs_in_every_thread(crs):
    """What every writer puts in GeoParquet metadata is what geopandas writes in a new process (whose
    threads have run nothing), whichever thread asks (tasks/store/geoparquet.crs_projjson says why)."""
    from concurrent.futures import ThreadPoolExecutor

    from tasks.store.geoparquet import crs_projjson
    from tests.crs_spelling import fresh_process_projjson

    want = fresh_process_projjson([crs])[crs]
    assert "datum_ensemble" in (want.get("base_crs") or want)  # WGS 84 as PROJ's database defines it
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(crs_projjson, [crs] * 8))
    assert all(g == want for g in got)


def test_a_version_with_another_spelling_is_caught(tmp_path):
    """The check the end-to-end tests run on every version sees a file whose CRS is spelled otherwise."""
    from pyproj import CRS

    from tests.crs_spelling import assert_crs_spelled_as_fresh_process

    _frame("EPSG:32630").to_parquet(tmp_path / "good.parquet", schema_version="1.1.0", index=False)
    assert_crs_spelled_as_fresh_process(tmp_path)
    wkt1 = CRS.from_wkt(CRS("EPSG:32630").to_wkt("WKT1_GDAL"))  # equal, without the datum ensemble
    (tmp_path / "sub").mkdir()
    _frame(wkt1).to_parquet(tmp_path / "sub" / "bad.parquet", schema_version="1.1.0", index=False)
    with pytest.raises(AssertionError, match="bad.parquet"):
        assert_crs_spelled_as_fresh_process(tmp_path)


def test_the_geometry_columns_own_crs_is_spelled_as_a_fresh_process_too(tmp_path):
    """GeoArrow puts the CRS in the geometry column's metadata as well; ``geo_table`` spells it as a new
    process does even when the frame's CRS object is spelled otherwise (an equal CRS from WKT1), and the
    version check looks at it."""
    import pyarrow.parquet as pq
    from pyproj import CRS

    from tasks.store.artifacts import geo_table
    from tests.crs_spelling import assert_crs_spelled_as_fresh_process, fresh_process_projjson

    wkt1 = CRS.from_wkt(CRS("EPSG:32630").to_wkt("WKT1_GDAL"))
    table = geo_table(_frame(wkt1), "EPSG:32630")
    field = json.loads(table.schema.field("geometry").metadata[b"ARROW:extension:metadata"])["crs"]
    assert field == fresh_process_projjson(["EPSG:32630"], field=True)["EPSG:32630"]
    pq.write_table(table, tmp_path / "good.parquet")
    assert_crs_spelled_as_fresh_process(tmp_path)
    ext = {b"ARROW:extension:name": b"geoarrow.wkb",
           b"ARROW:extension:metadata": json.dumps({"crs": wkt1.to_json_dict()}).encode()}  # fmt: skip
    i = table.schema.get_field_index("geometry")
    bad = table.set_column(i, table.schema.field(i).with_metadata(ext), table.column(i))
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(AssertionError, match="bad.parquet"):
        assert_crs_spelled_as_fresh_process(tmp_path)


@pytest.mark.parametrize("folder", [False, True])
def test_attributes_leave_geometry_bbox_and_excluded_columns_unread(tmp_path, folder):
    from tasks.store.artifacts import read_attributes

    path = tmp_path / ("parts" if folder else "t.parquet")
    target = path / "part.parquet" if folder else path
    target.parent.mkdir(exist_ok=True)
    _frame("EPSG:32630").to_parquet(target, schema_version="1.1.0", write_covering_bbox=True, index=False)
    full = read_attributes(path)
    assert list(full.columns) == ["site_id", "n", "label", *(["crs"] if folder else [])]
    fewer = read_attributes(path, exclude=("label",))
    assert "label" not in fewer and fewer.equals(full.drop(columns="label"))
