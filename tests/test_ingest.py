"""The ingest stage on the tiny demo region (checked against its truth files) and on real imagery."""

from __future__ import annotations

import re
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
import yaml
from pyproj import Transformer
from rasterio.windows import Window

from schemas.catalog import ARTIFACTS, load_catalog
from schemas.tables import TABLES, validate
from tasks.demo.layout import SITE_PX, scene_sites
from tasks.ingest.imagery import open_scene, site_windows
from tasks.ingest.labels import normalise_assignments, site_roles
from tasks.ingest.stage import run_ingest
from tasks.ingest.tiles import PERCENTILES, cloud_dn, tile_stats, visible_bands
from tasks.store.artifacts import geo_parts, read_table

REPO = Path(__file__).resolve().parents[1]
REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
IMAGERY = REAL / "imagery"
INGEST_ARTIFACTS = ("sites", "tiles", "labels", "assignments", "item_labels")

needs_real = pytest.mark.skipif(not IMAGERY.is_dir(), reason=f"real data not found at {REAL}")


# ---- helpers --------------------------------------------------------------------------------------
def _read_artifacts(out: Path) -> dict[str, pd.DataFrame]:
    cat = yaml.safe_load((REPO / "data_catalog.yaml").read_text(encoding="utf-8"))
    return {name: read_table(out / cat["datasets"][name]["uri"]) for name in INGEST_ARTIFACTS}


def _validate_all(tables: dict[str, pd.DataFrame]) -> None:
    for name, df in tables.items():
        if name == "labels":
            for part in geo_parts(df).values():
                validate(name, part.reset_index(drop=True))
        else:
            validate(name, df)


def _footprint(row) -> shapely.Polygon:
    """The grid square of a sites/tiles row (a Series or an itertuples row)."""
    get = row.__getitem__ if isinstance(row, pd.Series) else lambda k: getattr(row, k)
    a, _, c, _, e, f = list(get("transform"))[:6]
    return shapely.box(c, f + e * get("height"), c + a * get("width"), f)


def _input_rows_from_split_notes(labels: pd.DataFrame) -> float:
    """Each input polygon split into k parts yields k rows whose note says so: sum(1/k) = input rows."""
    k = (
        labels["repair_note"]
        .fillna("")
        .map(lambda n: int(m.group(1)) if (m := re.search(r"split into (\d+) polygons", n)) else 1)
    )
    return float((1.0 / k).sum())


def _direct_stats(path: Path, row: pd.Series, vis_idx: list[int], cloud_dn: float) -> dict:
    """Tile statistics from a plain windowed rasterio read, independent of the pipeline's Dask path."""
    with rasterio.open(path) as src:
        a, _, c, _, e, f = list(row["transform"])[:6]
        col = (c - src.transform.c) / src.transform.a
        rr = (f - src.transform.f) / src.transform.e
        assert col == pytest.approx(round(col)) and rr == pytest.approx(round(rr))  # on the scene grid
        assert (a, e) == pytest.approx((src.transform.a, src.transform.e))
        win = Window(round(col), round(rr), int(row["width"]), int(row["height"]))
        arr = src.read(window=win, boundless=True, fill_value=src.nodata or 0)
        nodata, size = src.nodata, (src.height, src.width)
    data = np.ones(arr.shape[1:], bool) if nodata is None else ~(arr == nodata).any(axis=0)
    ys = np.arange(win.row_off, win.row_off + win.height)[:, None]
    xs = np.arange(win.col_off, win.col_off + win.width)[None, :]
    data &= (ys >= 0) & (ys < size[0]) & (xs >= 0) & (xs < size[1])  # outside the scene: no data
    cloud = data & (arr[vis_idx].astype(float).mean(axis=0) > cloud_dn) if vis_idx else np.zeros_like(data)
    valid = data & ~cloud
    px = arr[:, valid].astype(float)
    q = np.percentile(px, PERCENTILES, axis=1)
    return {
        "nodata_fraction": 1 - data.mean(),
        "cloud_fraction": cloud.sum() / data.sum(),
        "valid_fraction": valid.mean(),
        "mean": px.mean(axis=1),
        "std": px.std(axis=1),
        "p02": q[0],
        "p50": q[1],
        "p98": q[2],
    }


def _assert_stats_match(tile, direct: dict) -> None:
    for key in ("nodata_fraction", "cloud_fraction", "valid_fraction"):
        assert tile[key] == pytest.approx(direct[key], abs=1e-12), key
    for key in ("mean", "std", "p02", "p50", "p98"):
        np.testing.assert_allclose(np.asarray(tile[key], float), direct[key], rtol=1e-9, err_msg=key)


# ---- the demo region ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ingest_out")
    result = run_ingest(load_catalog(demo_root / "data_catalog.yaml"), out)
    return {
        "result": result,
        "out": out,
        "tables": _read_artifacts(out),
        "truth_sites": pd.read_csv(demo_root / "truth" / "sites.csv", dtype={"site_id": str}),
        "in_labels": gpd.read_parquet(demo_root / "inputs" / "labels.parquet"),
        "in_assign": pd.read_csv(demo_root / "inputs" / "assignments.csv", dtype=str),
        "in_items": pd.read_csv(demo_root / "inputs" / "item_labels.csv", dtype=str),
    }


def test_every_artifact_is_written_and_validates(demo):
    result, tables = demo["result"], demo["tables"]
    assert set(result.artifacts) == {
        *INGEST_ARTIFACTS,
        "reuse_keys/ingest",
        "reuse_keys/ingest_labels",
        "reuse_keys/site_labels",
        "reuse_keys/site_labels_source",
    }
    assert set(INGEST_ARTIFACTS) <= set(ARTIFACTS)
    for name in INGEST_ARTIFACTS:
        rec = result.artifacts[name]
        assert rec["rows"] == len(tables[name]), name
        assert set(TABLES[name].columns) <= set(tables[name].columns), name
    _validate_all(tables)
    for name in ("sites", "tiles"):
        assert tables[name].crs.to_epsg() == 4326
    parts = sorted(p.name for p in (demo["out"] / "labels").iterdir())  # parts of sites, one CRS here
    assert parts and all(n.startswith("part-EPSG_32630-") and n.endswith(".parquet") for n in parts)
    assert {i["dataset"] for i in result.inputs} == {
        "imagery",
        "input_sites",
        "input_assignments",
        "input_labels",
        "input_item_labels",
    }


def test_sites_and_roles_match_truth(demo):
    sites, truth = demo["tables"]["sites"], demo["truth_sites"]
    assert sorted(sites["site_id"]) == sorted(truth["site_id"]) and len(sites) == 18
    merged = sites.merge(truth, on="site_id", suffixes=("", "_truth"))
    assert (merged["role"] == merged["role_truth"]).all()
    assert (merged["scene_id"] == merged["scene_id_truth"]).all()
    a = demo["in_assign"]
    done = a[a["completed_at"].notna()]
    crowd = done[done["labeller_id"] != "expert"].groupby("site_id").size()
    expected = sites["site_id"].map(crowd).fillna(0).astype(int)
    assert (sites["n_labellers"] == expected).all()
    gold = set(done.loc[done["labeller_id"] == "expert", "site_id"])
    assert set(sites.loc[sites["has_reference"], "site_id"]) == gold
    counts = demo["result"].counts
    for role in ("gold", "multi", "single", "unlabelled"):
        assert counts[f"sites_{role}"] == int((truth["role"] == role).sum()) > 0


def test_polygon_counts_follow_the_input(demo):
    labels, inp = demo["tables"]["labels"], demo["in_labels"]
    assert len(labels) >= len(inp)
    assert _input_rows_from_split_notes(labels) == pytest.approx(len(inp))
    assert demo["result"].counts["polygons"] == len(labels)
    # Per assignment, the polygons recorded match the label rows.
    assign = demo["tables"]["assignments"]
    per = labels.groupby(["site_id", "labeller_id"]).size()
    got = assign.set_index(["site_id", "labeller_id"])["n_polygons"]
    assert (got.loc[per.index] == per).all() and got.sum() == len(labels)
    in_per = inp.groupby(["site_id", "labeller_id"]).size()
    assert set(per.index) == set(in_per.index)
    assert (per.loc[in_per.index] >= in_per).all()
    # Stable polygon ids: site/labeller/ordinal.
    assert labels["polygon_id"].is_unique
    assert (
        labels["polygon_id"].str.rsplit("/", n=1).str[0] == labels["site_id"] + "/" + labels["labeller_id"]
    ).all()
    assert len(demo["tables"]["item_labels"]) == len(demo["in_items"])


def test_labels_are_native_and_inside_their_site(demo):
    labels, sites = demo["tables"]["labels"], demo["tables"]["sites"]
    assert set(labels["crs"]) == {"EPSG:32630"}
    part = geo_parts(labels)["EPSG:32630"]
    assert part.crs.to_epsg() == 32630
    fp = {r.site_id: _footprint(r) for r in sites.itertuples()}
    inside = [fp[s].buffer(1e-6).contains(g) for s, g in zip(part["site_id"], part.geometry, strict=True)]
    assert all(inside)
    assert set(part.geom_type) == {"Polygon"} and part.is_valid.all()
    np.testing.assert_allclose(part["area_m2"], part.area, rtol=1e-9)
    # Inputs (same CRS here) are clipped, never moved: every output lies within its input's site rows.
    inp = demo["in_labels"]
    for sid, grp in part.groupby("site_id"):
        assert (
            grp.union_all().difference(inp[inp["site_id"] == sid].make_valid().union_all().buffer(1e-6)).area
            < 1e-3
        )


def test_invalid_polygons_are_repaired_and_recorded(demo):
    labels, inp = demo["tables"]["labels"], demo["in_labels"]
    n_invalid_in = int((~inp.is_valid).sum())
    assert n_invalid_in > 0  # the demo's sloppy labellers draw self-intersecting rings
    bad = labels[~labels["was_valid"]]
    assert len(bad) >= n_invalid_in
    assert bad["repair_note"].str.contains("made valid").all()
    assert labels.loc[labels["was_valid"], "repair_note"].fillna("").str.contains("made valid").sum() == 0
    assert demo["result"].notes == [f"{len(bad)} invalid polygons repaired"]


def test_site_grids_are_exact_224_windows_on_the_scene_grid(demo, demo_root):
    """The EPSG:4326 site squares come back as the exact 224 x 224 px squares the scenes were painted with."""
    sites, tiles = demo["tables"]["sites"], demo["tables"]["tiles"]
    truth_boxes = {b.site_id: b for s in range(2) for b in scene_sites(s, 3)}
    for r in sites.itertuples():
        box = truth_boxes[r.site_id]
        assert (r.width, r.height) == (SITE_PX, SITE_PX)
        assert list(r.transform) == list(box.transform)[:6]
        assert r.crs == "EPSG:32630"
    assert (tiles["width"] == SITE_PX).all() and (tiles["height"] == SITE_PX).all()
    assert len(tiles) == len(sites)  # the demo's scenes do not overlap: one tile per site
    # The published footprint (EPSG:4326) is the input footprint.
    inp = gpd.read_file(demo_root / "inputs" / "sites.geojson").set_index("site_id")
    for r in sites.itertuples():
        a, b = r.geometry, inp.geometry.loc[r.site_id]
        assert a.symmetric_difference(b).area / a.area < 1e-3


def test_tile_stats_match_a_direct_read(demo, demo_root):
    tiles = demo["tables"]["tiles"].set_index("site_id")
    for sid in ("S00003", "S00000"):  # nodata + cloud; mostly nodata
        tile = tiles.loc[sid]
        assert list(tile["band_names"]) == ["B", "G", "R", "NIR"]
        path = demo_root / "inputs" / "imagery" / f"{tile['scene_id']}.tif"
        direct = _direct_stats(path, tile, [0, 1, 2], 4500.0)
        _assert_stats_match(tile, direct)
    assert tiles["content_hash"].is_unique and tiles["content_hash"].str.fullmatch(r"[0-9a-f]{32}").all()


def test_nodata_and_cloud_fractions_follow_truth(demo):
    tiles = demo["tables"]["tiles"].merge(demo["truth_sites"], on="site_id", suffixes=("", "_truth"))
    # nodata is 0 in all bands, exactly where the generator put it (truth rounded to 4 decimals)
    np.testing.assert_allclose(tiles["nodata_fraction"], tiles["nodata_fraction_truth"], atol=6e-5)
    assert ((tiles["nodata_fraction"] > 0) == (tiles["nodata_fraction_truth"] > 0)).all()
    assert (tiles["nodata_fraction_truth"] > 0.5).any()
    # Truth counts cloud alpha > 0.5; the catalog's threshold (visible mean > 4500) takes the denser core.
    cloudy = tiles["cloud_fraction_truth"] >= 0.01
    assert cloudy.sum() >= 5 and (tiles.loc[cloudy, "cloud_fraction"] > 0).all()
    assert (tiles.loc[tiles["cloud_fraction_truth"] == 0, "cloud_fraction"] == 0).all()
    upper = tiles["cloud_fraction_truth"] / (1 - tiles["nodata_fraction_truth"]) + 1e-3
    assert (tiles["cloud_fraction"] <= upper).all()
    np.testing.assert_allclose(
        tiles["valid_fraction"],
        (1 - tiles["nodata_fraction"]) * (1 - tiles["cloud_fraction"]),
        atol=1e-12,
    )


def test_no_field_assignments_are_kept_and_told_apart_from_pending(demo):
    a = demo["tables"]["assignments"]
    inp = demo["in_assign"]
    assert len(a) == len(inp)
    merged = a.merge(inp, on=["site_id", "labeller_id"], suffixes=("", "_in"))
    assert len(merged) == len(inp)
    pending_in = merged["completed_at_in"].isna()
    assert ((merged["status"] == "pending") == pending_in).all()
    assert merged.loc[pending_in, "completed_at"].isna().all()
    assert (merged.loc[pending_in, "n_polygons"] == 0).all() and pending_in.sum() > 0
    expected = pd.to_datetime(merged.loc[~pending_in, "completed_at_in"], utc=True)
    assert (merged.loc[~pending_in, "completed_at"] == expected).all()
    no_fields = (a["status"] == "completed") & (a["n_polygons"] == 0)
    assert no_fields.sum() >= 5 and a.loc[no_fields, "completed_at"].notna().all()
    assert demo["result"].counts["no_field_assignments"] == int(no_fields.sum())
    # field-free sites in truth are reported as "no fields" by their completed labellers (spammer aside)
    truth = demo["truth_sites"].set_index("site_id")
    honest = a[(a["status"] == "completed") & (a["labeller_id"] != "spammer")]
    free = honest[honest["site_id"].map(truth["n_true_fields"]) == 0]
    assert len(free) > 0 and (free["n_polygons"] == 0).all()
    assert (a["is_reference"] == (a["labeller_id"] == "expert")).all()


def test_item_labels(demo):
    items, inp = demo["tables"]["item_labels"], demo["in_items"]
    merged = items.merge(inp, on=["item_id", "labeller_id"], suffixes=("", "_in"))
    assert len(merged) == len(inp) == len(items)
    assert (merged["label"] == merged["label_in"]).all()
    assert (items["is_reference"] == (items["labeller_id"] == "expert")).all()


def test_ids_that_look_like_times_stay_text(demo_root, make_catalog, tmp_path):
    """A GeoJSON whose every site_id looks like a time ("T0000") would be parsed as times by GDAL."""
    cat_path = make_catalog(tmp_path)
    inputs = tmp_path / "inputs"
    rename = {f"S{i:05d}": f"T{i:04d}" for i in range(18)}
    text = (inputs / "sites.geojson").read_text(encoding="utf-8")
    for old, new in rename.items():
        text = text.replace(f'"{old}"', f'"{new}"')
    (inputs / "sites.geojson").write_text(text, encoding="utf-8")
    for name in ("assignments.csv", "item_labels.csv"):
        df = pd.read_csv(inputs / name, dtype=str, keep_default_na=False)
        df.iloc[:, 0] = df.iloc[:, 0].map(rename)
        df.to_csv(inputs / name, index=False)
    labels = gpd.read_parquet(inputs / "labels.parquet")
    labels["site_id"] = labels["site_id"].map(rename)
    labels.to_parquet(inputs / "labels.parquet")
    run_ingest(load_catalog(cat_path), tmp_path / "out")
    tables = _read_artifacts(tmp_path / "out")
    _validate_all(tables)
    assert sorted(tables["sites"]["site_id"]) == sorted(rename.values())
    assert tables["sites"]["site_id"].map(type).eq(str).all()
    assert set(tables["labels"]["site_id"]) <= set(rename.values())
    assert tables["labels"]["polygon_id"].str.startswith("T").all()
    assert set(tables["assignments"]["site_id"]) <= set(rename.values())


def test_no_polygons_at_all(make_catalog, tmp_path):
    """A campaign where nobody drew anything yet (every assignment pending) still ingests."""
    cat_path = make_catalog(tmp_path)
    inputs = tmp_path / "inputs"
    gpd.read_parquet(inputs / "labels.parquet").iloc[:0].to_parquet(inputs / "labels.parquet")
    a = pd.read_csv(inputs / "assignments.csv", dtype=str)
    a["completed_at"] = ""
    a.to_csv(inputs / "assignments.csv", index=False)
    result = run_ingest(load_catalog(cat_path), tmp_path / "out")
    tables = _read_artifacts(tmp_path / "out")
    _validate_all(tables)
    assert len(tables["labels"]) == 0 and result.counts["polygons"] == 0
    assert (tables["assignments"]["status"] == "pending").all()
    assert str(tables["assignments"]["completed_at"].dtype) == "datetime64[us, UTC]"
    assert (tables["sites"]["role"] == "unlabelled").all()


# ---- real imagery ---------------------------------------------------------------------------------
def _utm_square_to_4326(crs: str, x0: float, y0: float, x1: float, y1: float) -> shapely.Polygon:
    to_geo = Transformer.from_crs(crs, 4326, always_xy=True)
    xs, ys = to_geo.transform([x0, x1, x1, x0], [y0, y0, y1, y1])
    return shapely.Polygon(zip(xs, ys, strict=True))


def _real_inputs(folder: Path, crs: str, squares: dict[str, tuple]) -> None:
    """EPSG:4326 sites, one label polygon (both GeoJSON), assignments incl. a no-field and a pending one."""
    folder.mkdir(parents=True, exist_ok=True)
    sites = gpd.GeoDataFrame(
        {"site_id": list(squares)},
        geometry=[_utm_square_to_4326(crs, *sq) for sq in squares.values()],
        crs=4326,
    )
    sites.to_file(folder / "sites.geojson", driver="GeoJSON")
    first, second = list(squares)[:2]
    x0, y0, x1, y1 = squares[first]
    inner = _utm_square_to_4326(crs, x0 + (x1 - x0) * 0.3, y0 + (y1 - y0) * 0.3, x1 - (x1 - x0) * 0.3, y1 - 1)
    gpd.GeoDataFrame(
        {"site_id": [first], "labeller_id": ["ann"], "label": ["crop"]}, geometry=[inner], crs=4326
    ).to_file(folder / "labels.geojson", driver="GeoJSON")
    (folder / "assignments.csv").write_text(
        f"site_id,labeller_id,completed_at\n{first},ann,2024-05-01T10:00:00Z\n"
        f"{first},bob,2024-05-02T10:00:00+02:00\n{second},ann,\n",
        encoding="utf-8",
    )


def _real_catalog(make_catalog, folder: Path, scene: Path, **settings) -> Path:
    return make_catalog(
        folder,
        inputs=False,
        settings={"reference_labellers": [], "ingest": settings},
        datasets={
            "imagery": {"uri": str(scene)},
            "input_sites": {"uri": "sites.geojson"},
            "input_labels": {"uri": "labels.geojson"},
            "input_assignments": {"uri": "assignments.csv"},
        },
    )


def _check_real_run(out: Path, scene: Path, squares: dict[str, tuple], vis_idx: list[int], cloud_dn: float):
    tables = _read_artifacts(out)
    _validate_all(tables)
    sites, tiles, labels, assign = (tables[k] for k in ("sites", "tiles", "labels", "assignments"))
    with rasterio.open(scene) as src:
        crs, res = src.crs.to_string(), src.res
    assert sorted(sites["site_id"]) == sorted(squares) and len(tiles) == len(squares)
    for r in sites.itertuples():
        assert r.crs == crs and r.scene_id == scene.stem
        want = shapely.box(*squares[r.site_id])
        got = _footprint(r)
        assert got.symmetric_difference(want).area / want.area < 4 * max(res) / (
            want.bounds[2] - want.bounds[0]
        )
    for _, tile in tiles.iterrows():
        _assert_stats_match(tile, _direct_stats(scene, tile, vis_idx, cloud_dn))
    first, second = list(squares)[:2]
    assert len(labels) == 1 and labels["crs"].iloc[0] == crs and labels["site_id"].iloc[0] == first
    fp = _footprint(sites.set_index("site_id").loc[first])
    assert fp.buffer(1e-6).contains(labels["geometry"].iloc[0])
    st = assign.set_index(["site_id", "labeller_id"])
    assert st.loc[(first, "ann"), ["status", "n_polygons"]].tolist() == ["completed", 1]
    assert st.loc[(first, "bob"), ["status", "n_polygons"]].tolist() == ["completed", 0]
    assert st.loc[(first, "bob"), "completed_at"] == pd.Timestamp("2024-05-02T08:00:00Z")
    assert st.loc[(second, "ann"), "status"] == "pending"
    roles = sites.set_index("site_id")["role"]
    assert roles[first] == "multi" and roles[second] == "unlabelled"
    assert len(tables["item_labels"]) == 0
    return tables


@needs_real
def test_real_landsat(make_catalog, tmp_path):
    scene = IMAGERY / "landsat_rgb_byte.tif"
    with rasterio.open(scene) as src:
        assert (src.count, src.dtypes[0], src.nodata) == (3, "uint8", 0.0)
        left, top, crs = src.bounds.left, src.bounds.top, src.crs.to_string()
    squares = {
        "L_centre": (205_000.0, 2_705_000.0, 235_000.0, 2_735_000.0),
        "L_edge": (left + 3_000, top - 120_000, left + 33_000, top - 90_000),  # over the black margin
    }
    _real_inputs(tmp_path, crs, squares)
    # Landsat's bands are R, G, B: named, they get cloud screening at the uint8 default (220).
    cat = _real_catalog(
        make_catalog, tmp_path, scene, required_bands=3, band_names=["R", "G", "B"], cloud_threshold=None
    )
    run_ingest(load_catalog(cat), tmp_path / "out")
    tables = _check_real_run(tmp_path / "out", scene, squares, [0, 1, 2], 220.0)
    tiles = tables["tiles"].set_index("site_id")
    assert 0.1 < tiles.loc["L_edge", "nodata_fraction"] < 0.9
    assert tiles.loc["L_centre", "nodata_fraction"] < 0.02  # a few dark pixels have a 0 band
    assert list(tiles.loc["L_centre", "band_names"]) == ["R", "G", "B"]
    assert all(0 < m < 255 for m in tiles.loc["L_centre", "mean"])


@needs_real
def test_real_sentinel2_eight_bands(make_catalog, tmp_path):
    scene = IMAGERY / "sentinel2_austria_8band.tif"
    with rasterio.open(scene) as src:
        assert src.count == 8 and src.nodata is None
        crs = src.crs.to_string()
    squares = {
        "A_west": (360_000.0, 5_349_000.0, 361_500.0, 5_350_500.0),
        "A_east": (362_500.0, 5_350_000.0, 364_000.0, 5_351_500.0),
        "A_half_out": (358_630.0, 5_349_000.0, 359_630.0, 5_350_000.0),  # its west half is off the scene
    }
    _real_inputs(tmp_path, crs, squares)
    cat = _real_catalog(make_catalog, tmp_path, scene, required_bands=8, band_names=None)
    run_ingest(load_catalog(cat), tmp_path / "out")
    tables = _check_real_run(tmp_path / "out", scene, squares, [], 0.0)
    tiles = tables["tiles"]
    assert tiles["band_names"].map(list).map(len).eq(8).all()
    assert list(tiles["band_names"].iloc[0]) == [f"b{i}" for i in range(1, 9)]
    tiles = tiles.set_index("site_id")
    assert (tiles["cloud_fraction"] == 0).all() and tiles["mean"].map(len).eq(8).all()
    assert tiles.loc[["A_west", "A_east"], "nodata_fraction"].eq(0).all()
    assert (tiles.loc[["A_west", "A_east"], ["width", "height"]] == 150).all().all()
    # No nodata value in the file, yet the pixels off the scene are not data (nor zeros in the stats).
    assert tiles.loc["A_half_out", "nodata_fraction"] == pytest.approx(0.5)
    assert tiles.loc["A_half_out", "valid_fraction"] == pytest.approx(0.5)
    assert min(tiles.loc["A_half_out", "p02"]) > 0


def _spacenet_catalog(tmp_path: Path) -> Path:
    """examples/spacenet/data_catalog.yaml with absolute input paths and its root in ``tmp_path``."""
    example = REPO / "examples" / "spacenet" / "data_catalog.yaml"
    raw = yaml.safe_load(example.read_text(encoding="utf-8"))
    base = (example.parent / raw.pop("input_root", ".")).resolve()
    raw["root"] = str(tmp_path / "spacenet_root")
    for ds in raw["datasets"].values():
        if ds["kind"] == "input" and not Path(ds["uri"]).is_absolute():
            ds["uri"] = str((base / ds["uri"]).resolve())
    # The example lists no artifacts: load_catalog fills them in from the repository's catalog.
    path = tmp_path / "spacenet_catalog.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def test_example_catalog_loads_as_written():
    cat = load_catalog(REPO / "examples" / "spacenet" / "data_catalog.yaml")
    assert (
        cat.datasets["labels"].uri == "labels"
        and cat.datasets["input_labels"].constants["site_id"] == "SN0000"
    )


@needs_real
def test_real_spacenet_buildings_through_the_example_catalog(tmp_path):
    cat = load_catalog(_spacenet_catalog(tmp_path))
    assert Path(cat.input_path("imagery")).resolve() == (IMAGERY / "spacenet_sample.tif").resolve()
    result = run_ingest(cat, tmp_path / "out")
    tables = _read_artifacts(tmp_path / "out")
    _validate_all(tables)
    sites, tiles, labels, assign = (tables[k] for k in ("sites", "tiles", "labels", "assignments"))
    assert sites["site_id"].tolist() == ["SN0000"] and sites["role"].tolist() == ["single"]
    assert (sites["width"].iloc[0], sites["height"].iloc[0]) == (900, 900)
    assert list(sites["transform"].iloc[0]) == [0.5, 0.0, 733601.0, 0.0, -0.5, 3725139.0]
    buildings = gpd.read_file(IMAGERY / "spacenet_sample_buildings.geojson")
    assert len(buildings) == 43
    assert _input_rows_from_split_notes(labels) == pytest.approx(43)
    assert result.counts["polygons"] == len(labels) >= 43
    assert set(labels["crs"]) == {"EPSG:32616"} and set(labels["label"]) == {"building"}
    assert set(labels["labeller_id"]) == {"spacenet_team"}
    fp = _footprint(sites.iloc[0])
    assert all(fp.buffer(1e-6).contains(g) for g in labels["geometry"])
    # Clipped to the tile, the labelled area is the buildings' area inside the footprint.
    assert labels["area_m2"].sum() == pytest.approx(
        buildings.make_valid().intersection(fp).area.sum(), rel=1e-6
    )
    assert assign[["status", "n_polygons"]].values.tolist() == [["completed", len(labels)]]
    tile = tiles.iloc[0]
    assert list(tile["band_names"]) == ["pan"]
    _assert_stats_match(tile, _direct_stats(IMAGERY / "spacenet_sample.tif", tile, [], 0.0))


# ---- the stage's functions, one by one (plain Python: no Prefect, no cluster) -----------------------
def test_site_roles():
    a = pd.DataFrame(
        {
            "site_id": ["g", "g", "m", "m", "s", "s", "u", "p"],
            "labeller_id": ["expert", "x", "x", "y", "x", "y", "x", "x"],
            "status": ["completed"] * 5 + ["pending", "pending", "completed"],
            "is_reference": [True] + [False] * 7,
        }
    )
    roles = site_roles(["g", "m", "s", "u", "p", "none"], a).set_index("site_id")
    assert roles["role"].to_dict() == {
        "g": "gold",
        "m": "multi",
        "s": "single",
        "u": "unlabelled",
        "p": "single",
        "none": "unlabelled",
    }
    assert roles["n_labellers"].to_dict() == {"g": 1, "m": 2, "s": 1, "u": 0, "p": 1, "none": 0}
    assert roles["has_reference"].tolist() == [True, False, False, False, False, False]


def test_assignments_without_a_completed_at_column_are_all_complete():
    df = pd.DataFrame({"site_id": ["a", "b"], "labeller_id": ["x", "expert"]}, index=[1, 2])
    out = normalise_assignments(df, "a.csv", {"a", "b"}, {"expert"})
    assert out["status"].tolist() == ["completed", "completed"]
    assert out["completed_at"].isna().all() and str(out["completed_at"].dtype) == "datetime64[us, UTC]"
    assert out["is_reference"].tolist() == [False, True]


def test_cloud_thresholds_and_visible_bands():
    assert cloud_dn("uint8", None) == 220 and cloud_dn("uint16", None) == 4500
    assert cloud_dn("float32", None) == 0.45 and cloud_dn("uint8", 100) == 100
    assert visible_bands(["B", "G", "R", "NIR"]) == [0, 1, 2]
    assert visible_bands(["coastal", "Blue", "GREEN", "red", "nir"]) == [1, 2, 3]
    assert visible_bands(["b1", "b2", "b3"]) == []  # unnamed bands: no cloud screening


def test_float_scene_with_nan_nodata(tmp_path):
    """Float reflectance with NaN as nodata: NaN pixels are nodata, bright ones cloud, stats on the rest."""
    rng = np.random.default_rng(0)
    data = rng.uniform(0.02, 0.3, (4, 64, 64)).astype("float32")
    data[:, :8, :] = np.nan  # 8 of 64 rows: nodata
    data[:3, 40:48, :] = 0.9  # 8 rows of bright visible bands: cloud
    path = tmp_path / "refl.tif"
    profile = {"driver": "GTiff", "width": 64, "height": 64, "count": 4, "dtype": "float32", "nodata": np.nan}
    transform = rasterio.Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 5_000_640.0)
    with rasterio.open(path, "w", crs="EPSG:32633", transform=transform, **profile) as dst:
        dst.write(data)
    scene = open_scene(str(path), ["blue", "green", "red", "nir"], 4)
    site = _utm_square_to_4326("EPSG:32633", 500_000.0, 5_000_000.0, 500_640.0, 5_000_640.0)
    sites = gpd.GeoDataFrame({"site_id": ["F1"]}, geometry=[site], crs=4326)
    pairs = site_windows(sites, [scene], "sites")
    assert pairs[["col_off", "row_off", "width", "height"]].values.tolist() == [[0, 0, 64, 64]]
    tile = tile_stats(pairs, {scene.scene_id: scene}, None).iloc[0]
    assert tile["nodata_fraction"] == pytest.approx(8 / 64)
    assert tile["cloud_fraction"] == pytest.approx(8 / 56)
    assert tile["valid_fraction"] == pytest.approx(48 / 64)
    valid = np.concatenate([data[:, 8:40, :], data[:, 48:, :]], axis=1).reshape(4, -1).astype(float)
    np.testing.assert_allclose(tile["mean"], valid.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(tile["p98"], np.percentile(valid, 98, axis=1), rtol=1e-9)
