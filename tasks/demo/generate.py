"""Deterministic synthetic demo region: imagery, labels from simulated labellers, and the hidden truth.

``generate_demo_region`` writes ``inputs/`` (what a real labelling campaign would deliver) and ``truth/``
(what the pipeline should rediscover). Scenes are painted one at a time; only vector data accumulates.
"""

from __future__ import annotations

import csv
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
from pyproj import Transformer
from rasterio.features import rasterize
from shapely.geometry import Polygon

from tasks.demo.fields import site_ground, truth_fields
from tasks.demo.labellers import CROWD, EXPERT, draw, item_label, labellers_json
from tasks.demo.layout import CRS, SITE_PX, SiteBox, scene_id
from tasks.demo.plan import ROLES, Plan, make_plan
from tasks.demo.scenes import render_scene

TAG_GROUND, TAG_LABELS, TAG_ITEMS = 3, 4, 5
LABELLER_IDS = (EXPERT, *CROWD)
PARQUET_KW = {"schema_version": "1.1.0", "write_covering_bbox": True, "compression": "zstd", "index": False}


@dataclass(frozen=True)
class DemoSummary:
    root: Path
    n_scenes: int
    n_sites: int
    n_labellers: int
    role_counts: dict[str, int]
    n_completed: int
    n_pending: int
    n_polygons: int
    n_true_fields: int
    seconds: float


def _visible_fractions(fields: list[tuple[Polygon, str]], site: SiteBox, occluded: np.ndarray) -> list[float]:
    """Share of each true field's pixels that are neither nodata nor cloud (what a labeller can see)."""
    if not fields:
        return []
    ids = rasterize(
        ((g, i) for i, (g, _) in enumerate(fields, start=1)),
        out_shape=(SITE_PX, SITE_PX),
        transform=site.transform,
        fill=0,
        dtype="int32",
    )
    total = np.bincount(ids.ravel(), minlength=len(fields) + 1)
    seen = np.bincount(ids[~occluded], minlength=len(fields) + 1)
    return [float(seen[i] / total[i]) if total[i] else 1.0 for i in range(1, len(fields) + 1)]


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _write_sites_geojson(path: Path, plan: Plan) -> None:
    """Site squares in lon/lat: the four UTM corners reprojected (edges stay straight in lon/lat)."""
    to_ll = Transformer.from_crs(CRS, "EPSG:4326", always_xy=True)
    polys = []
    for sp in plan.sites:
        x0, y0, x1, y1 = sp.box.bounds
        lon, lat = to_ll.transform([x0, x1, x1, x0], [y1, y1, y0, y0])
        polys.append(Polygon(zip(np.round(lon, 9), np.round(lat, 9), strict=True)))
    gdf = gpd.GeoDataFrame({"site_id": [sp.site_id for sp in plan.sites]}, geometry=polys, crs="EPSG:4326")
    path.unlink(missing_ok=True)
    gdf.to_file(path, driver="GeoJSON")


def _gdf(columns: dict[str, list], geoms: list) -> gpd.GeoDataFrame:
    return gpd.GeoDataFrame(columns, geometry=gpd.GeoSeries(geoms, crs=CRS), crs=CRS)


def generate_demo_region(root: Path, scale: int = 1, seed: int = 0, sites_per_side: int = 8) -> DemoSummary:
    """Write a demo region of ``2 * scale`` scenes of ``sites_per_side``^2 sites under ``root``."""
    t0 = time.perf_counter()
    root = Path(root)
    n_scenes = 2 * scale
    plan = make_plan(seed, n_scenes, sites_per_side)
    lab_index = {lab: i for i, lab in enumerate(LABELLER_IDS)}
    completed: dict[str, list] = {}
    for a in plan.assignments:
        if a.completed:
            completed.setdefault(a.site_id, []).append(a)

    labels: dict[str, list] = {"site_id": [], "labeller_id": [], "label": []}
    label_geoms: list = []
    truth: dict[str, list] = {
        "field_id": [],
        "site_id": [],
        "label": [],
        "area_m2": [],
        "visible_fraction": [],
    }
    truth_geoms: list = []
    site_rows: list[list] = []
    item_rows: list[list] = []

    for s in range(n_scenes):
        sites = [sp for sp in plan.sites if sp.box.scene_idx == s]
        grounds = [
            site_ground(sp.box, sp.land_cover, np.random.default_rng([seed, TAG_GROUND, sp.box.index]))
            for sp in sites
        ]
        res = render_scene(
            root / "inputs" / "imagery" / f"{scene_id(s)}.tif", s, sites_per_side, grounds, seed
        )
        for sp, ground in zip(sites, grounds, strict=True):
            fields = truth_fields(sp.box, ground)
            nodata, cloud = res.site_masks(sp.box)
            vis = _visible_fractions(fields, sp.box, nodata | cloud)
            for j, ((geom, lab), v) in enumerate(zip(fields, vis, strict=True)):
                truth["field_id"].append(f"{sp.site_id}_F{j:03d}")
                truth["site_id"].append(sp.site_id)
                truth["label"].append(lab)
                truth["area_m2"].append(round(geom.area, 2))
                truth["visible_fraction"].append(round(v, 4))
                truth_geoms.append(geom)
            site_rows.append(
                [
                    sp.site_id,
                    scene_id(s),
                    sp.role,
                    sp.land_cover,
                    len(fields),
                    round(float(nodata.mean()), 4),
                    round(float(cloud.mean()), 4),
                ]
            )
            drawn = [(g, lab, v) for (g, lab), v in zip(fields, vis, strict=True)]
            for a in completed.get(sp.site_id, []):
                k = lab_index[a.labeller_id]
                rng = np.random.default_rng([seed, TAG_LABELS, sp.box.index, k])
                for geom, lab in draw(a.labeller_id, drawn, sp.box.bounds, a.time_rank, rng):
                    labels["site_id"].append(sp.site_id)
                    labels["labeller_id"].append(a.labeller_id)
                    labels["label"].append(lab)
                    label_geoms.append(geom)
                irng = np.random.default_rng([seed, TAG_ITEMS, sp.box.index, k])
                item_rows.append([sp.site_id, a.labeller_id, item_label(a.labeller_id, sp.land_cover, irng)])
        del res, grounds

    inputs, truth_dir = root / "inputs", root / "truth"
    truth_dir.mkdir(parents=True, exist_ok=True)
    _gdf(labels, label_geoms).to_parquet(inputs / "labels.parquet", **PARQUET_KW)
    _gdf(truth, truth_geoms).to_parquet(truth_dir / "fields.parquet", **PARQUET_KW)
    _write_sites_geojson(inputs / "sites.geojson", plan)
    _write_csv(
        inputs / "assignments.csv",
        ["site_id", "labeller_id", "completed_at"],
        [[a.site_id, a.labeller_id, a.completed_at or ""] for a in plan.assignments],
    )
    _write_csv(inputs / "item_labels.csv", ["item_id", "labeller_id", "label"], item_rows)
    _write_csv(
        truth_dir / "sites.csv",
        ["site_id", "scene_id", "role", "land_cover", "n_true_fields", "nodata_fraction", "cloud_fraction"],
        site_rows,
    )
    (truth_dir / "labellers.json").write_text(json.dumps(labellers_json(), indent=2) + "\n")

    roles = Counter(sp.role for sp in plan.sites)
    n_done = sum(a.completed for a in plan.assignments)
    return DemoSummary(
        root=root,
        n_scenes=n_scenes,
        n_sites=len(plan.sites),
        n_labellers=len(LABELLER_IDS),
        role_counts={r: roles.get(r, 0) for r in ROLES},
        n_completed=n_done,
        n_pending=len(plan.assignments) - n_done,
        n_polygons=len(label_geoms),
        n_true_fields=len(truth_geoms),
        seconds=round(time.perf_counter() - t0, 3),
    )
