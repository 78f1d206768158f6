"""Synthetic inputs with known truth for the consensus tests and benchmark.

Two levels: ``synthetic_region`` produces the stage's tables (sites / labels / assignments) with rectangular
fields drawn by labellers of known behaviour (misses, false fields, jittered edges, wrong classes);
``synthetic_masks`` produces raster votes drawn from the Dawid-Skene model itself (known sens / spec).
"""

from __future__ import annotations

from dataclasses import dataclass

import geopandas as gpd
import numpy as np
import pandas as pd
import pyproj
import shapely

from tasks.store.grid import SiteGrid


@dataclass(frozen=True)
class LabellerSpec:
    """Behaviour of a synthetic labeller (per true field / per site)."""

    p_miss: float = 0.1  # drop a true field
    n_false: float = 0.3  # Poisson mean of invented fields per site
    jitter_m: float = 3.0  # sd of each rectangle edge displacement
    p_wrong_class: float = 0.1
    p_unclassed: float = 0.0


@dataclass
class SyntheticRegion:
    sites: gpd.GeoDataFrame
    labels: gpd.GeoDataFrame
    assignments: pd.DataFrame
    truth: dict[str, list[tuple[shapely.Polygon, str]]]
    grids: dict[str, SiteGrid]


def _rect(rng, x0, y0, size_m, lo=0.12, hi=0.35):
    w, h = rng.uniform(lo, hi, 2) * size_m
    x = rng.uniform(x0, x0 + size_m - w)
    y = rng.uniform(y0, y0 + size_m - h)
    return shapely.box(x, y, x + w, y + h)


def _truth_fields(rng, x0, y0, size_m, n_max, classes) -> list[tuple[shapely.Polygon, str]]:
    out: list[tuple[shapely.Polygon, str]] = []
    for _ in range(int(rng.integers(0, n_max + 1)) * 4):
        if len(out) >= n_max:
            break
        r = _rect(rng, x0, y0, size_m)
        if all(not r.buffer(2.0).intersects(g) for g, _ in out):
            out.append((r, str(rng.choice(classes))))
    return out


def _draw(rng, truth, spec: LabellerSpec, x0, y0, size_m, classes):
    box = shapely.box(x0, y0, x0 + size_m, y0 + size_m)
    out = []
    for g, c in truth:
        if rng.random() < spec.p_miss:
            continue
        a, b, cc, d = g.bounds
        j = rng.normal(0, spec.jitter_m, 4)
        g2 = shapely.box(a + j[0], b + j[1], cc + j[2], d + j[3]).intersection(box)
        if g2.is_empty or g2.area <= 0:
            continue
        if rng.random() < spec.p_wrong_class:
            c = str(rng.choice([k for k in classes if k != c] or [c]))
        out.append((g2, None if rng.random() < spec.p_unclassed else c))
    for _ in range(rng.poisson(spec.n_false)):
        out.append((_rect(rng, x0, y0, size_m, 0.08, 0.2), str(rng.choice(classes))))
    return out


def synthetic_region(
    labellers: dict[str, LabellerSpec],
    n_sites: int = 12,
    size_px: int = 48,
    pixel_m: float = 5.0,
    per_site: int = 3,
    gold_every: int = 3,
    max_fields: int = 5,
    classes: tuple[str, ...] = ("crop", "fallow"),
    reference: str = "expert",
    crs: str = "EPSG:32633",
    seed: int = 0,
) -> SyntheticRegion:
    """Sites on one UTM grid; every ``gold_every``-th site also gets a perfect ``reference`` labeller."""
    rng = np.random.default_rng(seed)
    ids = sorted(labellers)
    size_m = size_px * pixel_m
    to4326 = pyproj.Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    sites, labels, assigns, truth, grids = [], [], [], {}, {}
    t0 = pd.Timestamp("2024-01-01", tz="UTC")
    for k in range(n_sites):
        sid = f"s{k:04d}"
        x0, y0 = 500000.0 + k * (size_m + 100), 4000000.0
        grid = SiteGrid(sid, crs, (pixel_m, 0.0, x0, 0.0, -pixel_m, y0 + size_m), size_px, size_px)
        grids[sid] = grid
        fields = _truth_fields(rng, x0, y0, size_m, max_fields, classes)
        truth[sid] = fields
        crew = [ids[(k + i) % len(ids)] for i in range(min(per_site, len(ids)))]
        gold = gold_every > 0 and k % gold_every == 0
        drawn = {lab: _draw(rng, fields, labellers[lab], x0, y0, size_m, classes) for lab in crew}
        if gold:
            drawn[reference] = list(fields)
        for lab, polys in drawn.items():
            for i, (g, c) in enumerate(polys):
                labels.append((f"{sid}-{lab}-{i}", sid, lab, c, g))
            when = t0 + pd.Timedelta(days=k, hours=ids.index(lab) if lab in ids else 0)
            assigns.append((sid, lab, when, "completed", len(polys), lab == reference))
        fp = shapely.transform(shapely.box(x0, y0, x0 + size_m, y0 + size_m),
                               lambda xy: np.column_stack(to4326.transform(xy[:, 0], xy[:, 1])))  # fmt: skip
        role = "gold" if gold else ("multi" if len(crew) > 1 else "single")
        sites.append((sid, "scene0", crs, list(grid.transform), size_px, size_px, role, len(crew), gold, fp))
    sites_gdf = gpd.GeoDataFrame(
        sites,
        columns=["site_id", "scene_id", "crs", "transform", "width", "height", "role", "n_labellers",
                 "has_reference", "geometry"],
        geometry="geometry",
        crs="EPSG:4326",
    )  # fmt: skip
    labels_gdf = gpd.GeoDataFrame(
        labels,
        columns=["polygon_id", "site_id", "labeller_id", "label", "geometry"],
        geometry="geometry",
        crs=crs,
    )
    assignments = pd.DataFrame(
        assigns, columns=["site_id", "labeller_id", "completed_at", "status", "n_polygons", "is_reference"]
    )
    return SyntheticRegion(sites_gdf, labels_gdf, assignments, truth, grids)


def synthetic_masks(
    sens: np.ndarray,
    spec: np.ndarray,
    n_sites: int = 20,
    size: int = 64,
    per_site: int | None = None,
    field_share: float = 0.35,
    seed: int = 0,
) -> list[tuple[tuple[str, ...], np.ndarray, np.ndarray]]:
    """(voter ids, votes (n, size*size) uint8, truth (size*size,) uint8) per site, votes drawn i.i.d. from
    each labeller's sensitivity / specificity on blocky truth masks."""
    rng = np.random.default_rng(seed)
    J = len(sens)
    ids = [f"L{j:02d}" for j in range(J)]
    out = []
    for _ in range(n_sites):
        coarse = rng.random((max(size // 8, 1),) * 2) < field_share
        truth = np.kron(coarse, np.ones((8, 8), bool))[:size, :size].reshape(-1)
        crew = np.sort(rng.choice(J, size=per_site or J, replace=False))
        u = rng.random((len(crew), truth.size))
        votes = np.where(truth[None, :], u < sens[crew, None], u >= spec[crew, None]).astype(np.uint8)
        out.append((tuple(ids[j] for j in crew), votes, truth.astype(np.uint8)))
    return out


def demo_tables(
    root, sites_per_side: int
) -> tuple[gpd.GeoDataFrame, gpd.GeoDataFrame, pd.DataFrame, gpd.GeoDataFrame]:
    """(sites, labels, assignments, truth fields) of a region written by ``tasks.demo.generate_demo_region``,
    shaped like the ingest artifacts (grids from the demo layout; no imagery is read)."""
    from pathlib import Path

    from tasks.demo.layout import CRS, SITE_PX, scene_sites

    root = Path(root)
    sites = gpd.read_file(root / "inputs" / "sites.geojson")
    n_scenes = 1 + max(int(s.split("_")[-1]) for s in pd.read_csv(root / "truth" / "sites.csv")["scene_id"])
    boxes = {b.site_id: b for k in range(n_scenes) for b in scene_sites(k, sites_per_side)}
    sites["crs"] = CRS
    sites["transform"] = [list(boxes[s].transform)[:6] for s in sites["site_id"]]
    sites["width"] = SITE_PX
    sites["height"] = SITE_PX
    labels = gpd.read_parquet(root / "inputs" / "labels.parquet")
    labels["polygon_id"] = [f"p{i:06d}" for i in range(len(labels))]
    a = pd.read_csv(root / "inputs" / "assignments.csv", dtype={"site_id": str, "labeller_id": str})
    a["completed_at"] = pd.to_datetime(a["completed_at"], utc=True)
    a["status"] = np.where(a["completed_at"].notna(), "completed", "pending")
    a["is_reference"] = False
    n_poly = labels.groupby(["site_id", "labeller_id"]).size()
    a["n_polygons"] = [
        int(n_poly.get((s, lab), 0)) for s, lab in zip(a["site_id"], a["labeller_id"], strict=True)
    ]
    truth = gpd.read_parquet(root / "truth" / "fields.parquet")
    return sites, labels, a, truth
