"""Ingest reads the label file a batch at a time and spills the rows by site until their part's task
normalises them (``readers.iter_vector_batches``, ``tasks/ingest/raw_label_rows.py``): the batches read like
the whole file, small batches and buckets give exactly the tables and keys of one whole read, a bad row in a
late batch is named, and neither success nor failure leaves the spill behind."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import pandas as pd
import pytest
import shapely

from schemas.catalog import load_catalog
from tasks.ingest import label_parts, raw_label_rows, readers
from tasks.ingest import labels as labels_mod
from tasks.ingest.label_keys import LABELS_STAGE
from tasks.ingest.readers import iter_vector_batches, read_vector
from tasks.ingest.stage import run_ingest
from tasks.store.artifacts import read_table
from tasks.store.errors import InputError
from tasks.store.reuse import read_keys

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "imagery"
TABLES = ("sites", "tiles", "labels", "assignments", "item_labels")


def _same_values(a: pd.Series, b: pd.Series) -> bool:
    """Equal cell by cell, every kind of missing value alike (readers spell it None, NaN or NA)."""
    return [None if pd.isna(v) else v for v in a] == [None if pd.isna(v) else v for v in b]


def _assert_reads_alike(path: Path, batch_rows: int, scratch: Path) -> list[gpd.GeoDataFrame]:
    whole = read_vector(path)
    batches = list(iter_vector_batches(path, batch_rows=batch_rows))
    assert all(len(b) <= batch_rows for b in batches)
    joined = pd.concat(batches)
    assert list(joined.columns) == list(whole.columns) and joined.crs == whole.crs
    assert list(joined.index) == list(whole.index) == list(range(1, len(whole) + 1))  # file row numbers
    for c in whole.columns.drop("geometry"):
        assert _same_values(joined[c], whole[c]), c
    assert joined.geometry.geom_equals_exact(whole.geometry, 0).all()
    if "site_id" in whole.columns:
        _assert_site_filter(path, batch_rows, whole, scratch)
    return batches


def _assert_site_filter(path: Path, batch_rows: int, whole: gpd.GeoDataFrame, scratch: Path) -> None:
    """Reading some sites' rows gives exactly those rows of the whole read, file row numbers kept, also
    through the catalog's rename map; a site not in the file gives nothing."""
    ids = sorted(set(whole["site_id"]))
    some = set(ids[1::3])
    expected = whole[whole["site_id"].isin(some)]
    for rename, src in ((None, path), ({"site_id": "tile"}, _renamed(path, "site_id", "tile", scratch))):
        batches = list(iter_vector_batches(src, rename, batch_rows=batch_rows, sites=some | {"nowhere"}))
        assert batches and all(len(b) for b in batches)  # batches without the sites' rows are skipped
        got = pd.concat(batches)
        assert list(got.index) == list(expected.index), rename
        assert list(got.columns) == list(expected.columns)
        assert _same_values(got["site_id"], expected["site_id"])
        assert got.geometry.geom_equals_exact(expected.geometry, 0).all()
    assert list(iter_vector_batches(path, batch_rows=batch_rows, sites={"nowhere"})) == []


def _renamed(path: Path, column: str, to: str, scratch: Path) -> Path:
    out = scratch / f"renamed_{path.name}"
    gdf = read_vector(path).rename(columns={column: to})
    gdf.to_parquet(out) if readers._is_parquet(path) else gdf.to_file(out)
    return out


def test_batches_read_like_the_whole_file(demo_root, tmp_path):
    labels = demo_root / "inputs" / "labels.parquet"  # GeoParquet with a bbox covering column
    assert len(_assert_reads_alike(labels, 50, tmp_path)) > 3
    gdf = gpd.read_parquet(labels)
    # ids a reader could take for times stay text; GDAL formats stream through Arrow
    gdf["site_id"] = [f"T{i:04d}" for i in range(len(gdf))]
    gdf["labeller_id"] = "2024-01-01"
    for name, driver in (("l.geojson", "GeoJSON"), ("l.gpkg", "GPKG"), ("l.fgb", "FlatGeobuf")):
        gdf.to_file(tmp_path / name, driver=driver)
        batches = _assert_reads_alike(tmp_path / name, 64, tmp_path)
        joined = pd.concat(batches)  # (FlatGeobuf's spatial index reorders the rows: read_vector's too)
        assert sorted(joined["site_id"]) == sorted(gdf["site_id"]) and set(joined["labeller_id"]) == {
            "2024-01-01"
        }
    real = REAL / "spacenet_sample_buildings.geojson"  # public labels, 60+ attribute columns, many empty
    assert len(_assert_reads_alike(real, 7, tmp_path)) == -(-len(read_vector(real)) // 7)


def test_an_empty_file_gives_one_empty_batch_and_a_bad_one_names_its_file(tmp_path):
    empty = tmp_path / "empty.geojson"
    empty.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    assert [len(b) for b in iter_vector_batches(empty)] == [0]
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match="broken.parquet.*unreadable vector file"):
        list(iter_vector_batches(broken))


@pytest.fixture
def small_batches(monkeypatch):
    """Batches of 50 rows, spill buckets of 2 sites, labels parts of 3 (the demo region is small)."""
    monkeypatch.setattr(label_parts, "PART_SITES", 3)
    monkeypatch.setattr(readers, "BATCH_ROWS", 50)
    monkeypatch.setattr(raw_label_rows, "SPILL_SITES", 2)


def test_ingest_in_small_batches_equals_one_whole_read(tmp_path, make_catalog, monkeypatch):
    catalog = load_catalog(make_catalog(tmp_path / "region"))
    monkeypatch.setattr(label_parts, "PART_SITES", 3)
    run_ingest(catalog, tmp_path / "whole")  # the whole file in one batch

    checked, read = [], []
    real_checks, real_read = labels_mod.label_checks, raw_label_rows.SpilledSites.read

    def checks(*args):
        check = real_checks(*args)

        def counted(gdf):
            checked.append(len(gdf))
            return check(gdf)

        return counted

    def read_back(self):
        rows = real_read(self)
        read.append((len(self.files), len(rows)))
        return rows

    monkeypatch.setattr(labels_mod, "label_checks", checks)
    monkeypatch.setattr(raw_label_rows.SpilledSites, "read", read_back)
    monkeypatch.setattr(readers, "BATCH_ROWS", 50)
    monkeypatch.setattr(raw_label_rows, "SPILL_SITES", 2)
    out = tmp_path / "batched"
    result = run_ingest(catalog, out)
    n_rows = len(gpd.read_parquet(catalog.input_path("input_labels")))
    assert sum(checked) == n_rows and len(checked) > 3 and max(checked) <= 50  # never the whole file
    assert len(read) == len(list((out / "labels").glob("*.parquet")))  # each part read back its own rows
    assert sum(r for _, r in read) == n_rows and max(r for _, r in read) < n_rows
    for name in TABLES:
        a, b = (
            read_table(out / catalog.datasets[name].uri),
            read_table(tmp_path / "whole" / catalog.datasets[name].uri),
        )
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=name)
    # the same raw keys, so the same part names: a file read in batches links the parts of a whole read
    keys = [{s: k for s, (k, _) in read_keys(v, LABELS_STAGE).items()} for v in (out, tmp_path / "whole")]
    assert keys[0] == keys[1] and len(keys[0]) > 3
    assert sorted(p.name for p in (out / "labels").iterdir()) == sorted(
        p.name for p in (tmp_path / "whole" / "labels").iterdir()
    )
    assert result.counts["polygons"] == len(read_table(out / "labels"))
    assert not [p for p in out.rglob("*") if p.name.endswith(".raw")]  # the spill is gone


def test_a_bad_row_in_a_late_batch_is_named_and_nothing_is_left(tmp_path, make_catalog, small_batches):
    catalog = load_catalog(make_catalog(tmp_path / "region"))
    path = catalog.input_path("input_labels")
    gdf = gpd.read_parquet(path)
    gdf.loc[gdf.index[-3], "label"] = "banana"  # a class the catalog does not allow, in the last batch
    gdf.to_parquet(path)
    out = tmp_path / "out"
    with pytest.raises(InputError, match="unknown class 'banana'") as info:
        run_ingest(catalog, out)
    assert info.value.row == len(gdf) - 2 and str(info.value).startswith(str(path))
    assert not [p for p in out.rglob("*") if "labels" in p.name]  # no spill, no table

    gdf = gpd.read_parquet(path)
    gdf.loc[gdf.index[-3], "label"] = gdf.loc[gdf.index[0], "label"]
    row = gdf.index[-5]
    gdf.loc[row, "geometry"] = shapely.affinity.translate(gdf.geometry.loc[row], xoff=50_000.0)
    gdf.to_parquet(path)  # now a polygon outside its site: found by the part's task, from spilled rows
    with pytest.raises(InputError, match="outside its site") as info:
        run_ingest(catalog, out)
    assert info.value.row == len(gdf) - 4
    assert not [p for p in out.rglob("*") if "labels" in p.name]
