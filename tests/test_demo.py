"""The demo region generator: file formats, campaign structure, determinism and measurable behaviours."""

from __future__ import annotations

import json
import re
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import rasterio
import shapely
from pyproj import Transformer
from rasterio.features import rasterize

from tasks.demo import DemoSummary, generate_demo_region

N_SIDE = 3
CROWD = ["precise", "sloppy_edges", "misses_small", "merger", "shifted", "spammer", "drifter"]


@pytest.fixture(scope="module")
def region(tmp_path_factory) -> tuple[Path, DemoSummary]:
    root = tmp_path_factory.mktemp("demo")
    return root, generate_demo_region(root, scale=1, seed=0, sites_per_side=N_SIDE)


@pytest.fixture(scope="module")
def tables(region):
    root, _ = region
    return {
        "labels": gpd.read_parquet(root / "inputs/labels.parquet"),
        "truth": gpd.read_parquet(root / "truth/fields.parquet"),
        "assign": pd.read_csv(root / "inputs/assignments.csv"),
        "items": pd.read_csv(root / "inputs/item_labels.csv"),
        "sites": pd.read_csv(root / "truth/sites.csv"),
        "geo": gpd.read_file(root / "inputs/sites.geojson"),
    }


def _site_boxes(root: Path) -> dict[str, shapely.Polygon]:
    """UTM site squares rebuilt from the lon/lat footprints."""
    geo = gpd.read_file(root / "inputs/sites.geojson")
    to_utm = Transformer.from_crs("EPSG:4326", "EPSG:32630", always_xy=True)
    out = {}
    for sid, g in zip(geo.site_id, geo.geometry, strict=True):
        x, y = to_utm.transform(*np.asarray(g.exterior.coords).T)
        out[sid] = shapely.box(np.round(x.min()), np.round(y.min()), np.round(x.max()), np.round(y.max()))
    return out


def test_imagery_is_cog_in_utm(region):
    root, summary = region
    tifs = sorted((root / "inputs/imagery").glob("*.tif"))
    assert [p.name for p in tifs] == ["scene_000.tif", "scene_001.tif"] and summary.n_scenes == 2
    bounds = []
    for p in tifs:
        with rasterio.open(p) as ds:
            assert ds.crs.to_epsg() == 32630
            assert ds.count == 4 and set(ds.dtypes) == {"uint16"}
            assert ds.descriptions == ("B", "G", "R", "NIR")
            assert ds.res == (4.0, 4.0) and ds.nodata == 0
            assert ds.width == ds.height == 2 * 16 + N_SIDE * 224 + (N_SIDE - 1) * 16
            assert all(b == (256, 256) for b in ds.block_shapes)
            assert ds.overviews(1)
            assert ds.compression.name.lower() in {"zstd", "deflate"}
            assert 500_000 < ds.bounds.left < 700_000 and 800_000 < ds.bounds.top < 1_000_000
            bounds.append(shapely.box(*ds.bounds))
    assert not bounds[0].intersects(bounds[1])


def test_sites_geojson_footprints(region, tables):
    root, summary = region
    geo = tables["geo"]
    assert geo.crs.to_epsg() == 4326
    assert len(geo) == summary.n_sites == 2 * N_SIDE**2 and geo.site_id.is_unique
    assert all(re.fullmatch(r"S\d{5}", s) for s in geo.site_id)
    assert all(len(g.exterior.coords) == 5 for g in geo.geometry)
    with rasterio.open(root / "inputs/imagery/scene_000.tif") as ds:
        scene = shapely.box(*ds.bounds)
    for sid, sq in _site_boxes(root).items():
        assert sq.area == pytest.approx((224 * 4) ** 2, rel=1e-3)
        if sid in {f"S{i:05d}" for i in range(N_SIDE**2)}:  # scene_000 sites: inside, off the edge
            assert scene.buffer(-16 * 4 + 1).contains(sq)


def test_tables_schema_and_string_ids(region, tables):
    root, _ = region
    geo_meta = json.loads(pq.read_schema(root / "inputs/labels.parquet").metadata[b"geo"])
    assert geo_meta["version"] == "1.1.0"
    assert "covering" in geo_meta["columns"]["geometry"]
    labels, truth = tables["labels"], tables["truth"]
    assert list(labels.columns[:3]) == ["site_id", "labeller_id", "label"]
    assert labels.crs.to_epsg() == 32630 and truth.crs.to_epsg() == 32630
    assert set(labels.geom_type) == {"Polygon"} and not labels.geometry.is_empty.any()
    assert set(labels.label) == {"crop", "fallow"} and set(truth.label) == {"crop", "fallow"}
    boxes = _site_boxes(root)
    for sid, g in zip(labels.site_id, labels.geometry, strict=True):
        assert boxes[sid].buffer(0.01).contains(shapely.envelope(g))
    for name in ("assign", "items", "sites"):
        for col in ("site_id", "item_id", "labeller_id"):
            if col in tables[name]:
                assert all(isinstance(v, str) for v in tables[name][col]), (name, col)
    assert truth.field_id.is_unique and all(isinstance(v, str) for v in truth.field_id)


def test_campaign_roles_and_assignments(region, tables):
    _, summary = region
    assign, sites, labels, items = tables["assign"], tables["sites"], tables["labels"], tables["items"]
    counts = sites.role.value_counts()
    assert (
        counts["gold"] >= 3 and counts["multi"] >= 4 and counts["single"] >= 3 and counts["unlabelled"] >= 3
    )
    assert summary.role_counts == {r: int(counts[r]) for r in ("gold", "multi", "single", "unlabelled")}

    done = assign[assign.completed_at.notna()]
    pending = assign[assign.completed_at.isna()]
    crew = done.groupby("site_id").labeller_id.apply(set)
    role = sites.set_index("site_id").role
    for sid, r in role.items():
        c = crew.get(sid, set())
        others = c - {"expert"}
        if r == "gold":
            assert "expert" in c and 3 <= len(others) <= 5
        elif r == "multi":
            assert "expert" not in c and 3 <= len(c) <= 5
        elif r == "single":
            assert len(c) == 1 and "expert" not in c
        else:
            assert not c
    gold_counts = done[done.site_id.map(role) == "gold"].labeller_id.value_counts()
    multi_ids = set(done[done.site_id.map(role) == "multi"].labeller_id)
    for lab in CROWD:
        assert gold_counts.get(lab, 0) >= 2 and lab in multi_ids

    assert len(pending) >= 2
    drawn = set(zip(labels.site_id, labels.labeller_id, strict=True))
    assert not any((s, lab) in drawn for s, lab in zip(pending.site_id, pending.labeller_id, strict=True))
    empty = [(s, lab) for s, lab in zip(done.site_id, done.labeller_id, strict=True) if (s, lab) not in drawn]
    assert empty, "some completed assignments must say 'no fields here'"
    fieldless = set(sites[(sites.n_true_fields == 0) & (sites.role != "unlabelled")].site_id)
    assert len(fieldless) >= 2 and any(s in fieldless for s, _ in empty)

    ts = pd.to_datetime(done.completed_at, format="%Y-%m-%dT%H:%M:%SZ", utc=True)
    assert ts.min() >= pd.Timestamp("2026-03-01", tz="UTC")
    assert ts.max() < pd.Timestamp("2026-05-01", tz="UTC")
    pairs = sorted(zip(items.item_id, items.labeller_id, strict=True))
    assert pairs == sorted(zip(done.site_id, done.labeller_id, strict=True))
    assert set(items.label) <= {"cropland", "grassland", "shrubland", "settlement", "water"}
    truth_counts = tables["truth"].site_id.value_counts()
    assert all(truth_counts.get(s, 0) == n for s, n in zip(sites.site_id, sites.n_true_fields, strict=True))


def test_labellers_documented(region):
    root, _ = region
    spec = json.loads((root / "truth/labellers.json").read_text())
    readme = (Path(__file__).parents[1] / "tasks/demo/README.md").read_text()
    assert set(spec) == {"expert", *CROWD}
    for lab, s in spec.items():
        assert s["behaviour"] and s["description"] and f"`{lab}`" in readme
        m = np.array(s["params"]["item_confusion"]["matrix"])
        assert m.shape == (5, 5) and np.allclose(m.sum(axis=1), 1.0, atol=1e-3)
    assert np.allclose(spec["spammer"]["params"]["item_confusion"]["matrix"], 0.2)


def test_deterministic_per_seed(region, tmp_path):
    root, _ = region
    generate_demo_region(tmp_path / "same", scale=1, seed=0, sites_per_side=N_SIDE)
    generate_demo_region(tmp_path / "other", scale=1, seed=1, sites_per_side=N_SIDE)
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert len(files) == 9
    for rel in files:
        assert (tmp_path / "same" / rel).read_bytes() == (root / rel).read_bytes(), rel
    for name in ("inputs/labels.parquet", "truth/fields.parquet", "inputs/assignments.csv"):
        assert (tmp_path / "other" / name).read_bytes() != (root / name).read_bytes(), name
    with (
        rasterio.open(root / "inputs/imagery/scene_001.tif") as a,
        rasterio.open(tmp_path / "other/inputs/imagery/scene_001.tif") as b,
    ):
        assert not np.array_equal(a.read(), b.read())


def _best_match(truth, labels, lab):
    """Per visible true field on sites ``lab`` labelled: best IoU and centroid offset of its best polygon."""
    mine = labels[labels.labeller_id == lab].copy()
    mine["geometry"] = mine.make_valid()
    rows = []
    for sid, polys in mine.groupby("site_id"):
        geoms = polys.geometry.values
        for t in truth[(truth.site_id == sid) & (truth.visible_fraction >= 0.5)].itertuples():
            ious = [t.geometry.intersection(p).area / t.geometry.union(p).area for p in geoms]
            k = int(np.argmax(ious))
            c, pc = t.geometry.centroid, geoms[k].centroid
            rows.append((sid, t.area_m2, ious[k], pc.x - c.x, pc.y - c.y, t.geometry))
    return pd.DataFrame(rows, columns=["site_id", "area", "iou", "dx", "dy", "geometry"])


def _union_iou(a, b) -> float:
    u = shapely.union(a, b).area
    return 1.0 if u == 0 else shapely.intersection(a, b).area / u


def test_labeller_behaviours_are_measurable(region, tables):
    root, _ = region
    labels, truth, assign, sites = tables["labels"], tables["truth"], tables["assign"], tables["sites"]
    gold = set(sites[sites.role == "gold"].site_id)
    done = assign[assign.completed_at.notna() & assign.site_id.isin(gold)]
    vis = truth[truth.visible_fraction >= 0.5]
    site_iou: dict[str, list[float]] = {}
    for sid, lab in zip(done.site_id, done.labeller_id, strict=True):
        t = shapely.union_all(vis[vis.site_id == sid].geometry.values)
        p = shapely.union_all(
            labels[(labels.site_id == sid) & (labels.labeller_id == lab)].make_valid().values
        )
        site_iou.setdefault(lab, []).append(_union_iou(t, p))
    assert np.mean(site_iou["spammer"]) < 0.25
    assert np.mean(site_iou["precise"]) > 0.8 and np.mean(site_iou["expert"]) > 0.85

    m = {lab: _best_match(truth, labels, lab) for lab in ("expert", "precise", "sloppy_edges", "shifted")}
    assert m["expert"].iou.median() > 0.95 and m["precise"].iou.median() > 0.9
    assert m["sloppy_edges"].iou.median() < m["precise"].iou.median() - 0.05
    boxes = _site_boxes(root)
    for lab, (ex, ey) in {"shifted": (9.6, -7.2), "precise": (0.0, 0.0)}.items():
        d = m[lab]
        inner = d[[boxes[s].buffer(-30).contains(g) for s, g in zip(d.site_id, d.geometry, strict=True)]]
        assert len(inner) >= 10
        assert inner.dx.median() == pytest.approx(ex, abs=1.5) and inner.dy.median() == pytest.approx(
            ey, abs=1.5
        )

    small = _best_match(truth, labels, "misses_small")
    assert (small.area < 8_000).sum() >= 5 and (small.area > 15_000).sum() >= 5
    assert (small[small.area < 8_000].iou < 0.3).all()
    assert (small[small.area > 15_000].iou > 0.5).mean() > 0.9

    merged = labels[labels.labeller_id == "merger"]
    seen = vis[vis.site_id.isin(set(merged.site_id))]
    assert len(merged) < 0.8 * len(seen)
    covers = [
        int((shapely.area(shapely.intersection(seen.geometry.values, g)) > 0.5 * seen.area).sum())
        for g in merged.make_valid()
    ]
    assert max(covers) >= 2


def test_fields_have_spectral_contrast(region, tables):
    root, _ = region
    truth = tables["truth"]
    with rasterio.open(root / "inputs/imagery/scene_001.tif") as ds:
        img = ds.read().astype(np.float64)
        t = ds.transform
        ids = set(tables["sites"][tables["sites"].scene_id == "scene_001"].site_id)
        f = truth[truth.site_id.isin(ids)]
        cls = rasterize(
            [(g, 1 if lab == "crop" else 2) for g, lab in zip(f.geometry, f.label, strict=True)],
            out_shape=img.shape[1:],
            transform=t,
            fill=0,
        )
    clear = (img[0] > 0) & (img[0] < 3000)  # not nodata, not cloud
    ndiff = img[3] - img[2]
    crop, fallow, bg = ndiff[clear & (cls == 1)], ndiff[clear & (cls == 2)], ndiff[clear & (cls == 0)]
    assert crop.mean() > bg.mean() + 800 and crop.mean() > fallow.mean() + 1500
    assert (img[0] > 4500).mean() > 0.005  # clouds exist
    assert 200 < np.median(img[1]) < 6000
    with rasterio.open(root / "inputs/imagery/scene_000.tif") as ds:
        a = ds.read()
    assert (a[:, 0, 0] == 0).all() and ((a == 0).all(axis=0)).mean() > 0.02
    assert ((a == 0).any(axis=0) & ~(a == 0).all(axis=0)).sum() == 0  # nodata is all-band
