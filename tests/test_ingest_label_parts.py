"""The ``labels`` table in parts of sites (tasks/store/site_parts.py, tasks/ingest/label_parts.py): a
reprocess links the parts of unchanged sites from the previous version and writes only the edited site's
part, and the folder reads back exactly as a full recompute's (and as the former one-file-per-CRS layout).
"""

from __future__ import annotations

import os
from pathlib import Path

import geopandas as gpd
import pandas as pd
import pytest
import shapely

from schemas.catalog import load_catalog
from tasks.ingest import label_parts
from tasks.ingest import labels as labels_mod
from tasks.ingest.stage import run_ingest
from tasks.store.artifacts import read_attributes, read_table, write_table
from tasks.store.errors import InputError
from tasks.store.folders import folder_record
from tasks.store.reuse import Reuse, label_tables_key, read_keys
from tasks.store.site_parts import plan_parts, previous_site_rows, write_parts
from tasks.store.site_rows import read_site_rows
from tasks.store.versions import VersionStore

TABLES = ("sites", "tiles", "labels", "assignments", "item_labels")


# ---- the mechanism ---------------------------------------------------------------------------------
def test_plan_parts_order_names_and_groups():
    keys = {f"S{i:03d}": f"k{i}" for i in range(10)}
    groups = {s: ("EPSG:32631" if i % 3 == 0 else "EPSG:32630") for i, s in enumerate(sorted(keys))}
    parts = plan_parts(keys, 3, groups, salt="x")
    assert [p.group for p in parts] == ["EPSG:32630"] * 2 + ["EPSG:32631"] * 2  # 6 and 4 sites
    assert [s for p in parts for s in p.sites] == sorted(
        sorted(keys), key=lambda s: (groups[s] != "EPSG:32630", s)
    )
    assert all(len(p.sites) <= 3 for p in parts)
    assert [p.name for p in parts] == sorted(p.name for p in parts)  # file order is row order
    assert all(p.name.startswith(("part-EPSG_32630-", "part-EPSG_32631-")) for p in parts)
    assert plan_parts(dict(reversed(keys.items())), 3, groups, salt="x") == parts  # order of the mapping
    # one site's key moves: only its part is renamed; a salt renames every part
    moved = plan_parts({**keys, "S004": "new"}, 3, groups, salt="x")
    renamed = [a.sites for a, b in zip(parts, moved, strict=True) if a.name != b.name]
    assert renamed == [next(p.sites for p in parts if "S004" in p.sites)]
    assert not {p.name for p in plan_parts(keys, 3, groups, salt="y")} & {p.name for p in parts}
    with pytest.raises(ValueError):
        plan_parts(keys, 0)


def _frame(sites: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"site_id": [s for s in sites for _ in range(2)], "v": range(2 * len(sites))})


def _write(df: pd.DataFrame, path: Path) -> None:
    df.to_parquet(path, index=False)


def test_write_parts_links_unchanged_parts_and_never_writes_through_a_link(tmp_path):
    keys = {f"S{i}": "a" for i in range(6)}
    parts = plan_parts(keys, 2)
    v1 = tmp_path / "v1"
    asked = []

    def rows(sites):
        asked.append(sites)
        return _frame(sites)

    first = write_parts(v1, parts, None, rows, _write)
    assert first.linked == [] and asked == [[s for p in parts for s in p.sites]]
    before = {p.name: (v1 / p.name).read_bytes() for p in parts}

    # the next version starts as a hard-linked copy of v1 (as a draft can); one site changed
    v2 = tmp_path / "v2"
    v2.mkdir()
    for p in parts:
        os.link(v1 / p.name, v2 / p.name)
    new = plan_parts({**keys, "S3": "b"}, 2)
    asked.clear()
    second = write_parts(v2, new, v1, rows, _write)
    changed = [p for p in new if p.name not in {q.name for q in parts}]
    assert second.written == changed and len(changed) == 1 and asked == [list(changed[0].sites)]
    for p in second.linked:
        assert os.stat(v2 / p.name).st_ino == os.stat(v1 / p.name).st_ino
    assert os.stat(v2 / changed[0].name).st_ino not in {os.stat(v1 / p.name).st_ino for p in parts}
    assert {p.name: (v1 / p.name).read_bytes() for p in parts} == before  # v1 untouched
    assert sorted(f.name for f in v2.glob("*.parquet")) == [p.name for p in new]  # no stale part left
    with pytest.raises(ValueError, match="no part holds"):
        write_parts(tmp_path / "v3", new, None, lambda sites: _frame([*sites, "S9"]), _write)


# ---- the labels table --------------------------------------------------------------------------------
@pytest.fixture
def published(tmp_path, make_catalog, monkeypatch):
    """The demo region with one published ingest, its labels in parts of 4 sites (the demo has few)."""
    monkeypatch.setattr(label_parts, "PART_SITES", 4)
    catalog = load_catalog(make_catalog(tmp_path / "region"))
    store = VersionStore(catalog.root_path)
    draft = store.new_draft()
    result = run_ingest(catalog, draft.path)
    store.publish(draft, {"artifacts": result.artifacts})
    return catalog, store.version_path(store.latest_id())


def _edit_one_polygon(catalog) -> str:
    path = catalog.input_path("input_labels")
    gdf = gpd.read_parquet(path)
    row = gdf.index[len(gdf) // 2]
    gdf.loc[row, "geometry"] = gdf.geometry.loc[row].buffer(-2.0)
    gdf.to_parquet(path)
    return str(gdf.loc[row, "site_id"])


def _inodes(folder: Path) -> dict[str, int]:
    return {p.name: os.stat(p).st_ino for p in folder.glob("*.parquet")}


def test_reprocess_links_every_part_but_the_edited_sites(published, tmp_path):
    catalog, prev = published
    site = _edit_one_polygon(catalog)
    inc, full = tmp_path / "inc", tmp_path / "full"
    r_inc = run_ingest(catalog, inc, reuse=Reuse(str(prev)))
    r_full = run_ingest(catalog, full, reuse=Reuse(str(prev), enabled=False))
    for name in TABLES:
        a, b = read_table(inc / catalog.datasets[name].uri), read_table(full / catalog.datasets[name].uri)
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=name)
    assert r_inc.artifacts["labels"]["checksum"] == r_full.artifacts["labels"]["checksum"]
    assert r_inc.artifacts["labels"]["rows"] == len(read_table(full / "labels"))
    assert r_inc.artifacts["labels"] == folder_record(inc / "labels", "labels", "*.parquet") | {
        "rows": r_inc.artifacts["labels"]["rows"]
    }

    old, new, fresh = _inodes(prev / "labels"), _inodes(inc / "labels"), _inodes(full / "labels")
    assert len(new) > 2 and sorted(new) == sorted(fresh)  # same parts, same names as a full recompute
    written = [n for n, ino in new.items() if old.get(n) != ino]
    assert len(written) == 1  # only the edited site's part is a new file; the others are links
    assert site in set(pd.read_parquet(inc / "labels" / written[0], columns=["site_id"])["site_id"])
    assert not set(fresh.values()) & set(old.values())  # a full recompute links nothing

    # the recorded label keys stay valid for the parts folder, and the readers see the usual table
    tables_key = read_keys(inc, "site_labels_source")["labels+assignments"][0]
    assert tables_key == label_tables_key(inc / "labels", inc / "assignments.parquet")
    labels = read_table(inc / "labels")
    assert labels["polygon_id"].is_monotonic_increasing  # one CRS here: sorted by site, as before
    some = sorted(set(labels["site_id"]))[1::5]
    expect = labels[labels["site_id"].isin(some)].reset_index(drop=True)
    pd.testing.assert_frame_equal(read_site_rows(inc / "labels", some), expect)
    pd.testing.assert_frame_equal(previous_site_rows(Reuse(str(inc)), "labels", some), expect)
    cols = ["polygon_id", "site_id", "labeller_id", "label", "area_m2", "was_valid", "crs"]
    pd.testing.assert_frame_equal(read_attributes(inc / "labels")[cols], labels[cols])


def test_reprocess_after_a_version_with_one_file_per_crs(published, tmp_path):
    """A previous version in the former layout: no part name matches, every row still equals a full
    recompute (unchanged sites' rows read from the old file, not normalised again)."""
    catalog, prev = published
    labels = read_table(prev / "labels")
    old_layout = tmp_path / "old"
    write_table("labels", labels, old_layout)
    for part in (prev / "labels").glob("*.parquet"):
        part.unlink()
    for part in old_layout.glob("*.parquet"):
        os.replace(part, prev / "labels" / part.name)
    assert [p.name for p in (prev / "labels").glob("*.parquet")] == ["part-EPSG_32630.parquet"]
    _edit_one_polygon(catalog)
    inc, full = tmp_path / "inc", tmp_path / "full"
    r_inc = run_ingest(catalog, inc, reuse=Reuse(str(prev)))
    run_ingest(catalog, full, reuse=Reuse(str(prev), enabled=False))
    assert r_inc.counts["ingest_labels_recomputed"] == 1
    for name in TABLES:
        a, b = read_table(inc / catalog.datasets[name].uri), read_table(full / catalog.datasets[name].uri)
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=name)
    assert _inodes(inc / "labels").keys() == _inodes(full / "labels").keys()


def test_ingest_normalises_and_writes_one_part_per_task(published, tmp_path, monkeypatch):
    """Each call of the geometry work gets one part's sites (a Dask task per part: no process holds the
    region's polygons), and the table equals one normalisation of every site at once."""
    catalog, prev = published
    calls: list[set[str]] = []
    real = labels_mod.normalise_label_geometry

    def spy(gdf, path, grids):
        calls.append(set(gdf["site_id"]))
        return real(gdf, path, grids)

    monkeypatch.setattr(labels_mod, "normalise_label_geometry", spy)
    run_ingest(catalog, tmp_path / "parts")
    parts = [set(pd.read_parquet(p, columns=["site_id"])["site_id"]) for p in _files(tmp_path / "parts")]
    assert len(parts) > 2 and len(calls) == len(parts)
    assert sorted(map(sorted, calls)) == sorted(map(sorted, parts))  # one call per part

    monkeypatch.setattr(label_parts, "PART_SITES", 10_000)  # the same inputs, every site in one call
    run_ingest(catalog, tmp_path / "whole")
    assert len(list((tmp_path / "whole" / "labels").glob("*.parquet"))) == 1
    pd.testing.assert_frame_equal(
        read_table(tmp_path / "parts" / "labels"), read_table(tmp_path / "whole" / "labels"), check_exact=True
    )


def test_a_bad_polygon_names_the_files_first_bad_row_and_leaves_no_labels_folder(published, tmp_path):
    """Parts run as tasks in any order: of two bad polygons the error names the one earlier in the file
    (here in the last part, the other in the first), and the parts written before are removed with the
    folder built aside."""
    catalog, prev = published
    path = catalog.input_path("input_labels")
    gdf = gpd.read_parquet(path)
    first, last = sorted(gdf["site_id"])[0], sorted(gdf["site_id"])[-1]
    row = gdf.index[gdf["site_id"] == last][0]
    gdf.loc[row, "geometry"] = shapely.affinity.translate(gdf.geometry.loc[row], xoff=50_000.0)  # no site
    later = gdf[gdf["site_id"] == first].iloc[[0]].copy()
    later["geometry"] = [shapely.affinity.translate(later.geometry.iloc[0], yoff=50_000.0)]
    gdf = pd.concat([gdf, later], ignore_index=True)  # the first site's bad polygon at the file's end
    gdf.to_parquet(path)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=f"outside its site '{last}'") as info:
        run_ingest(catalog, out)
    assert info.value.row == gdf.index.get_loc(row) + 1
    assert not [p for p in out.rglob("*") if "labels" in p.name]  # neither the folder nor a part of it


def _files(folder: Path) -> list[Path]:
    return sorted((folder / "labels").glob("*.parquet"))
