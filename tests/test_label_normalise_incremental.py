"""Incremental label normalisation: a site whose raw label inputs are unchanged takes its normalised
``labels`` rows from the last version, and the label watcher compares raw keys before normalising anything.

The contract: an ingest that reuses equals one that recomputes every site (table for table, byte for byte),
and ``detect_label_changes`` finds exactly what comparing fully normalised tables finds.
"""

from __future__ import annotations

import shutil

import geopandas as gpd
import pandas as pd
import pytest
import shapely
from pyproj import CRS

from schemas.catalog import load_catalog
from tasks.ingest import changes as changes_mod
from tasks.ingest import labels as labels_mod
from tasks.ingest import readers
from tasks.ingest.changes import detect_label_changes, input_label_keys, published_label_keys
from tasks.ingest.label_keys import LABELS_STAGE, LabelRowDigests, label_input_keys
from tasks.ingest.labels import normalise_assignments, validate_labels
from tasks.ingest.readers import read_table_file, read_vector
from tasks.ingest.stage import run_ingest
from tasks.store.artifacts import read_attributes, read_table, write_table
from tasks.store.errors import InputError
from tasks.store.reuse import (
    SITE_LABELS,
    Reuse,
    keys_path,
    read_keys,
    recorded_label_keys,
    site_label_keys,
)
from tasks.store.versions import VersionStore

TABLES = ("sites", "tiles", "labels", "assignments", "item_labels")


# ---- helpers -------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _several_batches(monkeypatch):
    """The label file read 64 rows at a time (the demo's has a few hundred), so ingest and detection key,
    check and spill or re-read it in several batches, as they do a large file."""
    monkeypatch.setattr(readers, "BATCH_ROWS", 64)


@pytest.fixture
def published(tmp_path, make_catalog):
    """A copy of the demo region with one published (ingest-only) version."""
    catalog = load_catalog(make_catalog(tmp_path / "region"))
    store = VersionStore(catalog.root_path)
    draft = store.new_draft()
    run_ingest(catalog, draft.path)
    store.publish(draft, {})
    return catalog


@pytest.fixture
def normalised(published, monkeypatch):
    """The site ids each call of the per-polygon geometry work received after ``published`` was ingested
    (a spy around the real function, not a stand-in)."""
    calls: list[set[str]] = []
    real = labels_mod.normalise_label_geometry

    def spy(gdf, path, grids):
        calls.append(set(gdf["site_id"]) if len(gdf) else set())
        return real(gdf, path, grids)

    monkeypatch.setattr(labels_mod, "normalise_label_geometry", spy)
    return calls


def _latest(catalog):
    store = VersionStore(catalog.root_path)
    return store.version_path(store.latest_id())


def _labels_path(catalog):
    return catalog.input_path("input_labels")


def _ingest_both(catalog, tmp_path, normalised):
    """(reusing result, recomputing result, their folders): both from the latest published version.
    ``normalised`` keeps only the reusing run's calls of the geometry work."""
    prev = str(_latest(catalog))
    inc, full = tmp_path / "inc", tmp_path / "full"
    r_inc = run_ingest(catalog, inc, reuse=Reuse(prev))
    n = len(normalised)
    r_full = run_ingest(catalog, full, reuse=Reuse(prev, enabled=False))
    del normalised[n:]
    return r_inc, r_full, inc, full


def _assert_same(catalog, r_inc, r_full, inc, full) -> None:
    for name in TABLES:
        a = read_table(inc / catalog.datasets[name].uri)
        b = read_table(full / catalog.datasets[name].uri)
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=name)
        assert r_inc.artifacts[name]["checksum"] == r_full.artifacts[name]["checksum"], name
    ka, kb = read_keys(inc, LABELS_STAGE), read_keys(full, LABELS_STAGE)
    assert {u: k for u, (k, _) in ka.items()} == {u: k for u, (k, _) in kb.items()}
    # the per-site keys of the normalised rows that later stages read are recorded, and are right
    for d in (inc, full):
        recorded = {u: k for u, (k, _) in read_keys(d, SITE_LABELS).items()}
        tables = [read_table(d / catalog.datasets[t].uri) for t in ("labels", "assignments")]
        assert recorded == site_label_keys(*tables) and len(recorded) > 0


def _full_comparison(catalog) -> tuple[list[str], list[str], list[str]]:
    """What comparing the fully normalised inputs with the published tables finds (the slow way)."""
    vdir = _latest(catalog)
    before = site_label_keys(*(read_table(vdir / catalog.datasets[t].uri) for t in ("labels", "assignments")))
    assert published_label_keys(vdir, catalog) == before  # what ingest recorded
    after = input_label_keys(catalog, read_table(vdir / catalog.datasets["sites"].uri))
    return (
        sorted(s for s in after.keys() & before.keys() if after[s] != before[s]),
        sorted(after.keys() - before.keys()),
        sorted(before.keys() - after.keys()),
    )


def _multi_polygon_site(gdf) -> tuple[str, str]:
    """A (site, labeller) with at least two polygons."""
    n = gdf.groupby(["site_id", "labeller_id"]).size()
    return n[n >= 2].index[0]


# ---- edits of the label inputs -------------------------------------------------------------------
def _move_polygon(catalog) -> set[str]:
    gdf = gpd.read_parquet(_labels_path(catalog))
    site = gdf["site_id"].iloc[0]
    gdf.loc[gdf.index[0], "geometry"] = gdf.geometry.iloc[0].buffer(-3.0)
    gdf.to_parquet(_labels_path(catalog))
    return {site}


def _change_class(catalog) -> set[str]:
    gdf = gpd.read_parquet(_labels_path(catalog))
    row = gdf.index[gdf["label"].notna()][-1]
    gdf.loc[row, "label"] = "fallow" if gdf.loc[row, "label"] == "crop" else "crop"
    gdf.to_parquet(_labels_path(catalog))
    return {gdf.loc[row, "site_id"]}


def _complete_pending(catalog) -> set[str]:
    path = catalog.input_path("input_assignments")
    a = pd.read_csv(path, dtype=str)
    row = a.index[a["completed_at"].isna()][0]
    a.loc[row, "completed_at"] = "2026-11-27T10:00:00Z"  # "no fields here"
    a.to_csv(path, index=False)
    return {a.loc[row, "site_id"]}


def _swap_two_polygons_of_one_labeller(catalog) -> set[str]:
    """Their file order numbers the polygons: the ids swap, so the site's labels change."""
    gdf = gpd.read_parquet(_labels_path(catalog))
    site, who = _multi_polygon_site(gdf)
    i, j = gdf.index[(gdf["site_id"] == site) & (gdf["labeller_id"] == who)][:2]
    order = list(gdf.index)
    pi, pj = order.index(i), order.index(j)
    order[pi], order[pj] = j, i
    assert not gdf.geometry.loc[i].equals(gdf.geometry.loc[j])
    gdf.loc[order].reset_index(drop=True).to_parquet(_labels_path(catalog))
    return {site}


def _reorder_sites(catalog) -> set[str]:
    """Rows grouped differently (sites reversed, each labeller's polygons still in order): no change."""
    gdf = gpd.read_parquet(_labels_path(catalog))
    gdf["_pos"] = range(len(gdf))
    gdf = gdf.sort_values(["site_id", "labeller_id", "_pos"], ascending=[False, True, True])
    gdf.drop(columns="_pos").reset_index(drop=True).to_parquet(_labels_path(catalog))
    return set()


def _delete_a_site(catalog) -> set[str]:
    gdf = gpd.read_parquet(_labels_path(catalog))
    site = gdf["site_id"].iloc[-1]
    gdf[gdf["site_id"] != site].to_parquet(_labels_path(catalog))
    path = catalog.input_path("input_assignments")
    a = pd.read_csv(path, dtype=str)
    a[a["site_id"] != site].to_csv(path, index=False)  # the site is no longer assigned at all
    return {site}


EDITS = {
    "move_polygon": _move_polygon,
    "change_class": _change_class,
    "complete_pending": _complete_pending,
    "swap_polygons": _swap_two_polygons_of_one_labeller,
    "reorder_sites": _reorder_sites,
    "delete_site": _delete_a_site,
}


# ---- ingest --------------------------------------------------------------------------------------
def test_unchanged_rerun_reuses_every_site(published, tmp_path, normalised):
    units = read_keys(_latest(published), LABELS_STAGE)
    assert len(units) == len(read_table(_latest(published) / "assignments.parquet")["site_id"].unique()) > 0
    r_inc, r_full, inc, full = _ingest_both(published, tmp_path, normalised)
    assert normalised == []  # no polygon was repaired, reprojected or clipped again
    assert (
        r_inc.counts[f"{LABELS_STAGE}_reused"] == len(units)
        and r_inc.counts[f"{LABELS_STAGE}_recomputed"] == 0
    )
    assert r_full.counts[f"{LABELS_STAGE}_recomputed"] == len(units)
    _assert_same(published, r_inc, r_full, inc, full)
    first = published.datasets["labels"].uri
    pd.testing.assert_frame_equal(read_table(_latest(published) / first), read_table(inc / first))
    version = _latest(published).name
    assert {c for _, c in read_keys(inc, LABELS_STAGE).values()} == {version}
    assert {c for _, c in read_keys(full, LABELS_STAGE).values()} == {"full"}


@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edit_recomputes_exactly_its_sites(published, tmp_path, normalised, edit):
    sites = EDITS[edit](published)
    before = read_keys(_latest(published), LABELS_STAGE)
    r_inc, r_full, inc, full = _ingest_both(published, tmp_path, normalised)
    after = read_keys(inc, LABELS_STAGE)
    recomputed = {u for u, (_, c) in after.items() if c == "inc"}
    changed_keys = {u for u in after if u not in before or before[u][0] != after[u][0]}
    present = sites & set(after)  # a deleted site has no unit any more
    assert recomputed == changed_keys == present
    assert r_inc.counts[f"{LABELS_STAGE}_recomputed"] == len(present)
    assert r_inc.counts[f"{LABELS_STAGE}_reused"] == len(after) - len(present)
    drawn = set(read_table(full / "labels")["site_id"])
    assert set().union(*normalised) == present & drawn  # the geometry work ran for the edited site only
    site_keys = read_keys(inc, SITE_LABELS)
    assert {u for u, (_, c) in site_keys.items() if c == "inc"} == present & set(site_keys)
    _assert_same(published, r_inc, r_full, inc, full)


# ---- change detection ----------------------------------------------------------------------------
@pytest.mark.parametrize("edit", list(EDITS))
def test_detection_finds_the_edited_sites_without_normalising_the_others(published, normalised, edit):
    sites = EDITS[edit](published)
    changes = detect_label_changes(published)
    assert changes.sites == sorted(sites)
    assert (changes.changed, changes.added, changes.removed) == _full_comparison(published)
    assert len(normalised) == 2  # detect, then the slow comparison above
    assert normalised[0] <= sites  # only the candidates' polygons were normalised
    if edit == "delete_site":
        assert changes.removed == sorted(sites) and changes.changed == []


def test_detection_without_raw_keys_compares_every_site(published, normalised):
    keys_path(_latest(published), LABELS_STAGE).unlink()  # a version ingested before raw keys existed
    assert detect_label_changes(published).sites == []
    sites = _move_polygon(published)
    assert detect_label_changes(published).changed == sorted(sites)
    assert normalised[0] == normalised[1] and len(normalised[0]) > 1


def _shrink_first_polygon_of_another_site(catalog, than: set[str]) -> str:
    gdf = gpd.read_parquet(_labels_path(catalog))
    row = gdf.index[~gdf["site_id"].isin(than)][0]
    gdf.loc[row, "geometry"] = gdf.geometry.loc[row].buffer(-2.0)
    gdf.to_parquet(_labels_path(catalog))
    return str(gdf.at[row, "site_id"])


def test_a_file_rewritten_between_detections_two_reads_is_read_again(published, monkeypatch):
    """Detection keys the file, then reads the changed sites' rows again: a writer in between must not
    make it compare one version's keys with another's rows (which missed the second edit)."""
    first = _move_polygon(published)
    real, calls, edited = changes_mod.read_label_input_rows, [], set(first)

    def then_someone_writes(*args, **kwargs):
        inputs = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:  # the first pass is done: another edit lands before the rows are read again
            edited.add(_shrink_first_polygon_of_another_site(published, edited))
        return inputs

    monkeypatch.setattr(changes_mod, "read_label_input_rows", then_someone_writes)
    changes = detect_label_changes(published)
    assert len(calls) == 2 and len(edited) == 2
    assert changes.sites == sorted(edited)
    assert (changes.changed, changes.added, changes.removed) == _full_comparison(published)


def test_a_file_that_keeps_changing_is_named(published, monkeypatch):
    real, edited = changes_mod.read_label_input_rows, _move_polygon(published)

    def always_someone_writes(*args, **kwargs):
        inputs = real(*args, **kwargs)
        edited.add(_shrink_first_polygon_of_another_site(published, edited))
        return inputs

    monkeypatch.setattr(changes_mod, "read_label_input_rows", always_someone_writes)
    with pytest.raises(InputError, match=f"{_labels_path(published)}.*changed during each of 3 reads"):
        detect_label_changes(published)


def test_raw_edit_that_normalises_to_the_same_labels_is_no_change(published):
    """A polygon written as a one-part MultiPolygon normalises to the same single polygon."""
    gdf = gpd.read_parquet(_labels_path(published))
    poly = gdf.index[gdf.geometry.geom_type == "Polygon"][0]
    gdf.loc[poly, "geometry"] = shapely.MultiPolygon([gdf.geometry.loc[poly]])
    gdf.to_parquet(_labels_path(published))
    changes = detect_label_changes(published)
    assert (changes.changed, changes.added, changes.removed) == _full_comparison(published)


# ---- bad input still names file, row and reason --------------------------------------------------
def _add_label(catalog, site, who, label, geom) -> int:
    gdf = gpd.read_parquet(_labels_path(catalog))
    extra = gpd.GeoDataFrame(
        {"site_id": [site], "labeller_id": [who], "label": [label]}, geometry=[geom], crs=gdf.crs
    )
    pd.concat([gdf, extra], ignore_index=True).to_parquet(_labels_path(catalog))
    return len(gdf) + 1


def test_polygon_outside_its_site_is_found_by_reusing_ingest_and_by_the_watcher(published, tmp_path):
    gdf = gpd.read_parquet(_labels_path(published))
    assert gdf.crs.is_projected
    site, who = gdf["site_id"].iloc[0], gdf["labeller_id"].iloc[0]
    far = shapely.affinity.translate(gdf.geometry.iloc[0], xoff=50_000.0)  # 50 km away: no site there
    row = _add_label(published, site, who, "crop", far)
    for call in (
        lambda: run_ingest(published, tmp_path / "inc", reuse=Reuse(str(_latest(published)))),
        lambda: detect_label_changes(published),
    ):
        with pytest.raises(InputError, match=f"outside its site '{site}'") as info:
            call()
        assert str(_labels_path(published)) in str(info.value) and info.value.row == row


def test_pending_assignment_with_polygons_is_found_by_the_watcher(published):
    path = published.input_path("input_assignments")
    a = pd.read_csv(path, dtype=str)
    gdf = gpd.read_parquet(_labels_path(published))
    row = a.index[
        (a["site_id"] == gdf["site_id"].iloc[0]) & (a["labeller_id"] == gdf["labeller_id"].iloc[0])
    ][0]
    a.loc[row, "completed_at"] = None
    a.to_csv(path, index=False)
    with pytest.raises(InputError, match="has polygons but no completed_at") as info:
        detect_label_changes(published)
    assert "assignments.csv" in str(info.value)


# ---- the raw key itself --------------------------------------------------------------------------
def test_raw_keys_follow_content_not_file_layout(published):
    vdir = _latest(published)
    grids = read_table(vdir / "sites.parquet")
    ds = published.datasets
    path = published.input_path("input_assignments")
    raw_a = read_table_file(path, ds["input_assignments"].columns, ds["input_assignments"].constants)
    a = normalise_assignments(raw_a, path, set(grids["site_id"]), set(published.settings.reference_labellers))
    gdf = read_vector(_labels_path(published), ds["input_labels"].columns, ds["input_labels"].constants)
    classes = published.settings.label_classes

    def keys(g, grids=grids, classes=classes, a=a):
        valid = validate_labels(g, "labels", grids, a, classes)
        return label_input_keys(LabelRowDigests.of(valid), a, grids, classes)

    base = keys(gdf)
    digests = LabelRowDigests()  # fed a batch at a time, as ingest reads a large file
    for start in range(0, len(gdf), 37):
        digests.add(validate_labels(gdf.iloc[start : start + 37], "labels", grids, a, classes))
    assert label_input_keys(digests, a, grids, classes) == base
    assert base == {u: k for u, (k, _) in read_keys(vdir, LABELS_STAGE).items()}  # what ingest recorded
    site, who = _multi_polygon_site(gdf)
    mine = (gdf["site_id"] == site) & (gdf["labeller_id"] == who)
    regrouped = pd.concat([gdf[mine], gdf[~mine]]).sort_values(["labeller_id"], kind="stable")
    assert keys(regrouped) == base  # rows may move freely, each labeller's of a site staying in order
    swapped = pd.concat([gdf[~mine], gdf[mine].iloc[::-1]])
    assert _diff(keys(swapped), base) == {site}  # this labeller's order numbers its polygons

    moved = gdf.copy()
    moved.loc[moved.index[0], "geometry"] = shapely.affinity.translate(moved.geometry.iloc[0], 1e-7)
    assert _diff(keys(moved), base) == {gdf["site_id"].iloc[0]}
    extra = gdf.assign(note="x")  # a column normalisation does not read
    assert keys(extra) == base
    wkt1 = CRS.from_wkt(gdf.crs.to_wkt("WKT1_GDAL"))  # the same CRS spelled without its datum ensemble
    assert wkt1 == gdf.crs and wkt1.to_wkt() != gdf.crs.to_wkt()
    assert keys(gdf.set_crs(wkt1, allow_override=True)) == base

    transforms = [[float(v) for v in t] for t in grids["transform"]]
    transforms[0][2] += 1.0  # the first site's grid moves by a metre
    shifted = grids.assign(transform=pd.Series(transforms, index=grids.index, dtype=object))
    assert _diff(keys(gdf, grids=shifted), base) == {grids["site_id"].iloc[0]}
    assert set(_diff(keys(gdf, classes=[*classes, "orchard"]), base)) == set(base)
    ref = normalise_assignments(raw_a, path, set(grids["site_id"]), set())
    assert _diff(keys(gdf, a=ref), base) == set(a.loc[a["is_reference"], "site_id"])


def _diff(a: dict, b: dict) -> set[str]:
    return {s for s in a.keys() | b.keys() if a.get(s) != b.get(s)}


def test_recorded_label_keys_are_trusted_only_for_the_tables_they_were_made_from(published, tmp_path):
    vdir, ds = _latest(published), published.datasets
    paths = [vdir / ds[t].uri for t in ("labels", "assignments")]
    sites = read_table(paths[1])["site_id"]
    labels = read_table(paths[0])
    assert recorded_label_keys(vdir, sites, *paths) == site_label_keys(labels, read_table(paths[1]))
    # the attribute columns alone (label_issues plans its batches from them) read back the same rows
    cols = ["polygon_id", "site_id", "labeller_id", "label"]
    pd.testing.assert_frame_equal(read_attributes(paths[0])[cols], labels[cols].reset_index(drop=True))
    # a copy whose labels table was rewritten with one polygon moved: the record no longer applies
    copy = tmp_path / "copy"
    shutil.copytree(vdir, copy)
    labels.loc[0, "geometry"] = shapely.affinity.translate(labels.loc[0, "geometry"], 4.0, 0.0)
    shutil.rmtree(copy / ds["labels"].uri)
    write_table("labels", labels, copy / ds["labels"].uri)
    moved = [copy / ds[t].uri for t in ("labels", "assignments")]
    assert recorded_label_keys(copy, sites, *moved) is None
    assert published_label_keys(copy, published) == site_label_keys(labels, read_table(moved[1]))
