"""Bad input: every case names the file, the row (where there is one) and the reason, and publishes nothing.

Most cases go through ``run_ingest`` directly; a few representative ones go through the CLI's ``refresh``
(a Prefect server and a Dask cluster, ~15 s each) to show the error reaches the user with exit code 2 and
that no version or draft is left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rasterio
import shapely
from typer.testing import CliRunner

from schemas.catalog import CatalogError, load_catalog
from tasks.demo.layout import scene_sites
from tasks.ingest.readers import read_table_file, require_ids
from tasks.ingest.stage import run_ingest
from tasks.store.errors import InputError
from tasks.store.versions import DRAFT_PREFIX, VersionStore

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
WRONG_CRS = REAL / "imagery" / "spacenet_sample_buildings_wrong_crs.geojson"
BOX = {b.site_id: b for s in range(2) for b in scene_sites(s, 3)}  # the demo's UTM site squares


# ---- helpers --------------------------------------------------------------------------------------
@pytest.fixture
def region(make_catalog, tmp_path) -> Path:
    """A private copy of the demo inputs; returns its catalog path (inputs under ``<folder>/inputs``)."""
    return make_catalog(tmp_path / "region")


def _inputs(cat_path: Path) -> Path:
    return cat_path.parent / "inputs"


def _ingest_error(cat_path: Path, exc_type=InputError) -> Exception:
    out = cat_path.parent / "failed_out"
    with pytest.raises(exc_type) as exc:
        run_ingest(load_catalog(cat_path), out)
    assert not out.exists() or not any(out.rglob("*"))  # nothing half-written
    return exc.value


def _assert_names(err: InputError, path: Path | str, row: int | None, *reason: str) -> None:
    msg = str(err)
    assert str(path) in msg, msg
    if row is not None:
        assert err.row == row and f"row {row}:" in msg, msg
    for words in reason:
        assert words in err.reason, msg


def _add_labels(cat_path: Path, rows: list[tuple[str, str, str | None, object]]) -> int:
    """Append (site_id, labeller_id, label, geometry) rows to the labels; return the first new row number."""
    path = _inputs(cat_path) / "labels.parquet"
    labels = gpd.read_parquet(path)
    extra = gpd.GeoDataFrame(
        {"site_id": [r[0] for r in rows], "labeller_id": [r[1] for r in rows], "label": [r[2] for r in rows]},
        geometry=[r[3] for r in rows],
        crs=labels.crs,
    )
    pd.concat([labels, extra], ignore_index=True).to_parquet(path)
    return len(labels) + 1


def _inside(site_id: str, x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
    """Metres relative to the site's lower-left corner -> absolute UTM coordinates."""
    b = BOX[site_id]
    return b.x0 + x0, b.y0 + y0, b.x0 + x1, b.y0 + y1


def _append_csv_row(path: Path, line: str) -> int:
    text = path.read_text(encoding="utf-8")
    path.write_text(text.rstrip("\n") + "\n" + line + "\n", encoding="utf-8")
    return len(text.strip().splitlines())  # data rows before + 1 (the header) = the new row's number


# ---- CRS ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".parquet", ".gpkg"])
def test_labels_without_crs(region, suffix):
    labels = gpd.read_parquet(_inputs(region) / "labels.parquet").set_crs(None, allow_override=True)
    path = _inputs(region) / f"labels_nocrs{suffix}"
    if suffix == ".parquet":
        labels.to_parquet(path)
    else:
        with pytest.warns(UserWarning, match="crs"):
            labels.to_file(path)
    cat = region.parent / "cat2.yaml"
    cat.write_text(region.read_text().replace("inputs/labels.parquet", f"inputs/{path.name}"))
    err = _ingest_error(cat)
    _assert_names(err, path, None, "no CRS")


def _rewrite_scene(path: Path, **changes) -> None:
    with rasterio.open(path) as src:
        data, profile = src.read(), src.profile
    profile.update(driver="GTiff", **changes)
    for key in ("blockxsize", "blockysize", "tiled"):
        profile.pop(key, None)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)


def test_raster_without_crs(region):
    scene = _inputs(region) / "imagery" / "scene_001.tif"
    _rewrite_scene(scene, crs=None)
    _assert_names(_ingest_error(region), scene, None, "no CRS")


def test_raster_in_geographic_crs(region):
    scene = _inputs(region) / "imagery" / "scene_001.tif"
    _rewrite_scene(scene, crs="EPSG:4326")
    _assert_names(_ingest_error(region), scene, None, "EPSG:4326 is not projected")


@pytest.mark.skipif(not WRONG_CRS.exists(), reason=f"real data not found at {REAL}")
def test_real_labels_whose_crs_lies(make_catalog, tmp_path):
    """The real SpaceNet file claims EPSG:4326 (GeoJSON's default) but holds projected metres."""
    cat = make_catalog(
        tmp_path,
        datasets={
            "input_labels": {
                "uri": str(WRONG_CRS),
                "constants": {"site_id": "S00001", "labeller_id": "drifter"},
            }
        },
    )
    err = _ingest_error(cat)
    _assert_names(err, WRONG_CRS, 1, "is geographic but coordinates reach", "look projected", "CRS is wrong")


def test_projected_coordinates_far_outside_the_declared_crs(region):
    labels = gpd.read_parquet(_inputs(region) / "labels.parquet")
    labels.set_crs("EPSG:2056", allow_override=True).to_parquet(_inputs(region) / "labels.parquet")
    err = _ingest_error(region)
    _assert_names(err, _inputs(region) / "labels.parquet", None, "outside the area of use", "EPSG:2056")


# ---- geometries -----------------------------------------------------------------------------------
def test_bow_tie_is_repaired_and_recorded(region):
    """S00004 is field-free: its completed labellers drew nothing, so the rows added are the only ones."""
    x0, y0, x1, y1 = _inside("S00004", 200, 200, 400, 400)
    bow_tie = shapely.Polygon([(x0, y0), (x1, y1), (x1, y0), (x0, y1)])
    crossing = shapely.box(*_inside("S00004", 800, 100, 1000, 300))  # the site is 896 m wide
    assert not bow_tie.is_valid
    _add_labels(region, [("S00004", "precise", "crop", bow_tie), ("S00004", "merger", None, crossing)])
    out = region.parent / "out"
    run_ingest(load_catalog(region), out)
    (part,) = [
        p
        for p in (out / "labels").glob("part-EPSG_32630-*.parquet")
        if "S00004" in pq.read_table(p)["site_id"].to_pylist()
    ]
    labels = gpd.read_parquet(part).query("site_id == 'S00004'")
    tie = labels[labels["labeller_id"] == "precise"]
    assert len(tie) == 2 and not tie["was_valid"].any()
    assert tie["repair_note"].str.contains("made valid: Self-intersection").all()
    assert tie["repair_note"].str.contains("split into 2 polygons").all()
    assert tie["area_m2"].tolist() == pytest.approx([10_000.0, 10_000.0])
    assert sorted(tie["polygon_id"]) == ["S00004/precise/0", "S00004/precise/1"]
    clipped = labels[labels["labeller_id"] == "merger"]
    assert len(clipped) == 1 and clipped["was_valid"].all() and clipped["label"].isna().all()
    assert clipped["repair_note"].iloc[0] == "clipped to site footprint"
    assert clipped["area_m2"].iloc[0] == pytest.approx(96 * 200)
    assign = pd.read_parquet(out / "assignments.parquet").set_index(["site_id", "labeller_id"])
    assert assign.loc[("S00004", "precise"), "n_polygons"] == 2
    assert assign.loc[("S00004", "merger"), "n_polygons"] == 1


@pytest.mark.parametrize(
    "geom", [shapely.Polygon(), None, shapely.Point(601100, 898100)], ids=["empty", "missing", "point"]
)
def test_empty_or_non_polygon_geometry(region, geom):
    row = _add_labels(region, [("S00004", "precise", "crop", geom)])
    err = _ingest_error(region)
    reason = "labels must be polygons" if isinstance(geom, shapely.Point) else "empty or missing geometry"
    _assert_names(err, _inputs(region) / "labels.parquet", row, reason)


def test_polygon_entirely_outside_its_site(region):
    far = shapely.box(*_inside("S00000", 100, 100, 300, 300))  # drawn in another site
    row = _add_labels(region, [("S00004", "precise", "crop", far)])
    err = _ingest_error(region)
    _assert_names(err, _inputs(region) / "labels.parquet", row, "outside its site 'S00004'")


def test_empty_site_footprint(region):
    path = _inputs(region) / "sites.geojson"
    doc = json.loads(path.read_text())
    doc["features"][4]["geometry"] = None
    path.write_text(json.dumps(doc))
    _assert_names(_ingest_error(region), path, 5, "empty or missing footprint")


def test_site_outside_every_scene(region):
    path = _inputs(region) / "sites.geojson"
    sites = gpd.read_file(path)
    sites.loc[2, "geometry"] = shapely.box(10.0, 50.0, 10.01, 50.01)
    sites.to_file(path, driver="GeoJSON")
    _assert_names(_ingest_error(region), path, 3, "'S00002' lies outside every imagery scene")


# ---- ids and references ---------------------------------------------------------------------------
def test_labels_for_an_unknown_site(region):
    row = _add_labels(region, [("S99999", "precise", "crop", shapely.box(*_inside("S00004", 1, 1, 9, 9)))])
    _assert_names(_ingest_error(region), _inputs(region) / "labels.parquet", row, "unknown site_id 'S99999'")


def test_labels_from_a_labeller_without_assignment(region):
    row = _add_labels(region, [("S00004", "ghost", "crop", shapely.box(*_inside("S00004", 1, 1, 9, 9)))])
    err = _ingest_error(region)
    _assert_names(
        err, _inputs(region) / "labels.parquet", row, "labeller 'ghost' has no assignment for site 'S00004'"
    )


def test_assignment_for_an_unknown_site(region):
    path = _inputs(region) / "assignments.csv"
    row = _append_csv_row(path, "S77777,precise,2026-03-03T10:00:00Z")
    _assert_names(_ingest_error(region), path, row, "unknown site_id 'S77777'")


def test_duplicate_site_ids(region):
    path = _inputs(region) / "sites.geojson"
    doc = json.loads(path.read_text())
    doc["features"].append(doc["features"][1])
    path.write_text(json.dumps(doc))
    _assert_names(_ingest_error(region), path, 19, "duplicate site_id='S00001' (first seen at row 2)")


def test_duplicate_assignments_name_the_first_row_of_the_same_key(region):
    path = _inputs(region) / "assignments.csv"
    lines = path.read_text(encoding="utf-8").splitlines()
    # row 10 repeated as row 51 and row 3 as row 52: the first duplicate (row 51) was first seen at row 10
    path.write_text("\n".join([*lines, lines[10], lines[3]]) + "\n", encoding="utf-8")
    site, labeller = lines[10].split(",")[:2]
    err = _ingest_error(region)
    _assert_names(
        err, path, 51, f"duplicate site_id={site!r}, labeller_id={labeller!r} (first seen at row 10)"
    )


def test_duplicate_item_labels(region):
    path = _inputs(region) / "item_labels.csv"
    lines = path.read_text(encoding="utf-8").splitlines()
    row = _append_csv_row(path, lines[5].rsplit(",", 1)[0] + ",water")
    item, labeller = lines[5].split(",")[:2]
    err = _ingest_error(region)
    _assert_names(
        err, path, row, f"duplicate item_id={item!r}, labeller_id={labeller!r} (first seen at row 5)"
    )


def test_pending_assignment_with_polygons(region):
    path = _inputs(region) / "assignments.csv"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[1].startswith("S00000,drifter,")  # drifter drew polygons on S00000
    lines[1] = "S00000,drifter,"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    _assert_names(_ingest_error(region), path, 1, "'S00000' by 'drifter' has polygons but no completed_at")


def test_ids_stay_text_in_csv(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("site_id,labeller_id\n007,T0000\n1e3,NaN\n2024-01-02,12:30\n,x\n", encoding="utf-8")
    df = read_table_file(path)
    assert df["site_id"].tolist()[:3] == ["007", "1e3", "2024-01-02"]
    assert df["labeller_id"].tolist() == ["T0000", "NaN", "12:30", "x"]
    with pytest.raises(InputError) as exc:
        require_ids(df, ["site_id", "labeller_id"], path)
    _assert_names(exc.value, path, 4, "site_id is empty")


def test_numeric_ids_in_parquet_tables_become_text(tmp_path):
    path = tmp_path / "a.parquet"
    table = pa.table(
        {
            "site_id": pa.array([7, 8, None], pa.int64()),
            "labeller_id": pa.array(["a", None, "c"]),
            "completed_at": pa.array([1, None, 2], pa.timestamp("us", tz="UTC")),
        }
    )
    pq.write_table(table, path)
    df = read_table_file(path)
    assert df["site_id"].tolist() == ["7", "8", None]  # not "7.0": a gap must not turn ids into floats
    assert df["labeller_id"].tolist() == ["a", None, "c"]
    assert str(df["completed_at"].dtype).startswith("datetime64")
    with pytest.raises(InputError) as exc:
        require_ids(df, ["site_id"], path)
    _assert_names(exc.value, path, 3, "site_id is empty")


def test_numeric_site_ids_end_to_end(region):
    """Sites with text ids "100".. and an assignments Parquet whose ids are integers: they meet as text."""
    inputs = _inputs(region)
    ids = {f"S{i:05d}": str(100 + i) for i in range(18)}
    text = (inputs / "sites.geojson").read_text()
    for old, new in ids.items():
        text = text.replace(f'"{old}"', f'"{new}"')
    (inputs / "sites.geojson").write_text(text)
    a = pd.read_csv(inputs / "assignments.csv", dtype=str)
    a["site_id"] = a["site_id"].map(ids).astype("int64")
    a.to_parquet(inputs / "assignments.parquet")
    items = pd.read_csv(inputs / "item_labels.csv", dtype=str)
    items["item_id"] = items["item_id"].map(ids)
    items.to_csv(inputs / "item_labels.csv", index=False)
    labels = gpd.read_parquet(inputs / "labels.parquet")
    labels["site_id"] = labels["site_id"].map(ids)
    labels.to_parquet(inputs / "labels.parquet")
    region.write_text(region.read_text().replace("inputs/assignments.csv", "inputs/assignments.parquet"))
    out = region.parent / "out"
    run_ingest(load_catalog(region), out)
    got = pd.read_parquet(out / "assignments.parquet")
    assert got["site_id"].tolist() == a["site_id"].astype(str).tolist()
    assert sorted(gpd.read_parquet(out / "sites.parquet")["site_id"]) == sorted(ids.values())
    # A vector file is not converted: integer ids there are refused, by row.
    labels["site_id"] = labels["site_id"].astype("int64")
    labels.to_parquet(inputs / "labels.parquet")
    err = _ingest_error(region)
    _assert_names(err, inputs / "labels.parquet", 1, "site_id was read as int", "not text")


# ---- values ---------------------------------------------------------------------------------------
def test_unknown_class(region):
    row = _add_labels(region, [("S00004", "precise", "wheat", shapely.box(*_inside("S00004", 1, 1, 9, 9)))])
    err = _ingest_error(region)
    _assert_names(
        err, _inputs(region) / "labels.parquet", row, "unknown class 'wheat'; allowed: ['crop', 'fallow']"
    )


def test_unknown_item_class(region):
    path = _inputs(region) / "item_labels.csv"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0] + ",forest"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    _assert_names(_ingest_error(region), path, 3, "unknown class 'forest'")


def test_bad_completed_at(region):
    path = _inputs(region) / "assignments.csv"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[4] = ",".join(lines[4].split(",")[:2]) + ",yesterday"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    _assert_names(_ingest_error(region), path, 4, "completed_at 'yesterday' is not an ISO-8601 time")


def test_missing_columns(region):
    path = _inputs(region) / "assignments.csv"
    a = pd.read_csv(path, dtype=str).rename(columns={"labeller_id": "annotator"})
    a.to_csv(path, index=False)
    _assert_names(_ingest_error(region), path, None, "missing required columns ['labeller_id']")


def test_non_utf8_csv(region):
    path = _inputs(region) / "assignments.csv"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[7] = lines[7].replace(",", ",Jos\u00e9_", 1)
    path.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    _assert_names(_ingest_error(region), path, 7, "not UTF-8 text")


# ---- imagery --------------------------------------------------------------------------------------
def test_truncated_geotiff(region):
    """Half a COG: the header opens, the pixel blocks behind it fail while the tiles are computed."""
    scene = _inputs(region) / "imagery" / "scene_001.tif"
    data = scene.read_bytes()
    scene.write_bytes(data[: len(data) // 2])
    err = _ingest_error(region)
    _assert_names(err, scene, None, "corrupt or truncated imagery")
    assert err.path == str(scene)  # the broken file alone, not every scene of the batch


@pytest.mark.parametrize("content", [b"", b"II*\x00" + os.urandom(4000), os.urandom(5000)])
def test_garbage_with_a_tif_name(region, content):
    bad = _inputs(region) / "imagery" / "scene_009.tif"
    bad.write_bytes(content)
    _assert_names(_ingest_error(region), bad, None, "not a readable GeoTIFF")


def _small_scene(path: Path, dtype: str, count: int) -> None:
    b = BOX["S00000"]
    profile = {
        "driver": "GTiff",
        "width": 32,
        "height": 32,
        "count": count,
        "dtype": dtype,
        "crs": "EPSG:32630",
        "transform": rasterio.Affine(4.0, 0.0, b.x0, 0.0, -4.0, b.y1),
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.ones((count, 32, 32), dtype=dtype))


def test_complex_band_layout(region):
    bad = _inputs(region) / "imagery" / "scene_complex.tif"
    _small_scene(bad, "complex64", 4)
    _assert_names(_ingest_error(region), bad, None, "unsupported band layout", "complex64")


def test_too_few_bands(make_catalog, tmp_path):
    cat = make_catalog(tmp_path, settings={"ingest": {"required_bands": 5}})
    err = _ingest_error(cat)
    _assert_names(err, tmp_path / "inputs" / "imagery" / "scene_000.tif", None, "4 bands, need at least 5")


def test_band_names_do_not_match_the_bands(make_catalog, tmp_path):
    cat = make_catalog(tmp_path, settings={"ingest": {"band_names": ["B", "G", "R"]}})
    err = _ingest_error(cat)
    _assert_names(err, tmp_path / "inputs" / "imagery" / "scene_000.tif", None, "4 bands but 3 band names")


def test_no_imagery(region):
    shutil.rmtree(_inputs(region) / "imagery")
    err = _ingest_error(region)
    _assert_names(err, _inputs(region) / "imagery" / "*.tif", None, "no imagery file matches")


# ---- through the CLI: exit code 2, the message, and no version or draft left ------------------------
# Errors raised on a Dask worker reach the user through the installed ``labelrefinery`` command (run here
# as a subprocess, as a user runs it); the in-process cases use typer's CliRunner.
def _publish_first_version(cat_path: Path) -> str:
    catalog = load_catalog(cat_path)
    store = VersionStore(catalog.root_path)
    with store.lock():
        draft = store.new_draft()
        draft.artifacts.update(run_ingest(catalog, draft.path).artifacts)
        store.publish(draft, {"note": "first"})
    return draft.version_id


def _refresh_command(cat_path: Path, topology) -> subprocess.CompletedProcess:
    """``labelrefinery refresh`` as a user runs it against a running Prefect server (the session's, which
    spares each run a temporary server's start; the refresh still starts its own Dask cluster)."""
    exe = Path(sys.executable).with_name("labelrefinery")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "flows.cli"]
    return subprocess.run(
        [*cmd, "refresh", "--catalog", str(cat_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cat_path.parent,
        env={**topology.env, "COLUMNS": "250"},
    )


def _refresh_in_process(cat_path: Path):
    from flows.cli import app

    return CliRunner().invoke(app, ["refresh", "--catalog", str(cat_path)])


def _assert_nothing_published(cat_path: Path, before: list[str]) -> None:
    store = VersionStore(cat_path.parent)  # the demo catalog's root is "."
    assert store.list() == before and store.latest_id() == before[-1]
    assert not [p for p in store.dir.iterdir() if p.name.startswith(DRAFT_PREFIX)]


def test_cli_duplicate_assignment(region, topology):
    first = _publish_first_version(region)
    path = _inputs(region) / "assignments.csv"
    row = _append_csv_row(path, path.read_text(encoding="utf-8").splitlines()[6])
    result = _refresh_command(region, topology)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"error: {path}: row {row}: duplicate site_id=" in result.stderr
    assert "(first seen at row 6)" in result.stderr
    _assert_nothing_published(region, [first])


def test_cli_truncated_geotiff(region, topology):
    """The read fails inside the Dask graph on a worker; the user still gets the file and exit code 2."""
    first = _publish_first_version(region)
    scene = _inputs(region) / "imagery" / "scene_000.tif"
    data = scene.read_bytes()
    scene.write_bytes(data[: len(data) // 2])
    result = _refresh_command(region, topology)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"error: {scene}: corrupt" in result.stderr
    _assert_nothing_published(region, [first])


def test_cli_refresh_while_another_holds_the_lock(region):
    first = _publish_first_version(region)
    with VersionStore(region.parent).lock():
        result = _refresh_in_process(region)
    assert result.exit_code == 2, result.output
    assert "another refresh is running" in result.output and str(region.parent) in result.output
    _assert_nothing_published(region, [first])


def test_cli_broken_catalog(region):
    first = _publish_first_version(region)
    region.write_text(region.read_text().replace("schema: tiles", "schema: tilez"))
    with pytest.raises(CatalogError):
        load_catalog(region)
    result = _refresh_in_process(region)
    assert result.exit_code == 2, result.output
    assert f"error: {region}: invalid catalog" in result.output and "datasets.tiles.schema" in result.output
    _assert_nothing_published(region, [first])
