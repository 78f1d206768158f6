"""Pseudo-labels against known true fields (the demo region's ``truth/fields.parquet``).

Not part of any stage (real campaigns have no truth); tests and ``benchmarks/bench_learn_cpu.py`` use it to
check that the precision promised on out-of-sample polygons holds on sites no labeller touched.
"""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd

from tasks.learn.data import rasterise_ids
from tasks.learn.run import read_prob_raster
from tasks.learn.vectorise import best_iou
from tasks.store.artifacts import read_table
from tasks.store.grid import SiteGrid


def evaluate_against_truth(
    version_dir: str | Path,
    truth_fields: gpd.GeoDataFrame,
    source: str = "unlabelled",
    match_iou: float = 0.5,
) -> dict:
    """Polygon precision/recall (IoU >= ``match_iou``) and pooled pixel IoU on sites of one ``source``.

    Reported for the kept polygons (what is published as pseudo-labels) and for all polygons, plus the
    pixel IoU of the probability raster (field = interior + boundary >= 0.5) as the model's ceiling.
    """
    version_dir = Path(version_dir)
    sites = read_table(version_dir / "sites.parquet").set_index("site_id")
    labels = read_table(version_dir / "pseudo_labels")
    labels = labels[labels["source"] == source] if len(labels) else labels
    site_ids = sorted(
        p.stem
        for p in (version_dir / "pseudo_probabilities").glob("*.tif")
        if p.stem in sites.index and _role_matches(sites, p.stem, source)
    )
    acc = {
        k: 0.0 for k in ("tp_kept", "n_kept", "tp_all", "n_all", "n_true", "i_kept", "u_kept", "i_p", "u_p")
    }
    for site_id in site_ids:
        grid = SiteGrid.from_row({"site_id": site_id, **sites.loc[site_id].to_dict()})
        t = truth_fields[truth_fields["site_id"] == site_id]
        if len(t) and t.crs is not None and t.crs.to_string() != grid.crs:
            t = t.to_crs(grid.crs)
        truth = rasterise_ids(grid, list(t.geometry))
        mine = labels[labels["site_id"] == site_id]
        kept = rasterise_ids(grid, list(mine.loc[mine["kept"].astype(bool), "geometry"]))
        every = rasterise_ids(grid, list(mine["geometry"]))
        for name, pred in (("kept", kept), ("all", every)):
            bp, _ = best_iou(pred, truth)
            acc[f"tp_{name}"] += float((bp >= match_iou).sum())
            acc[f"n_{name}"] += int(pred.max())
        acc["n_true"] += int(truth.max())
        acc["i_kept"] += float(((kept > 0) & (truth > 0)).sum())
        acc["u_kept"] += float(((kept > 0) | (truth > 0)).sum())
        prob = read_prob_raster(version_dir / "pseudo_probabilities" / f"{site_id}.tif")
        field = np.nan_to_num(prob[1] + prob[2]) >= 0.5
        acc["i_p"] += float((field & (truth > 0)).sum())
        acc["u_p"] += float((field | (truth > 0)).sum())

    def ratio(a, b):
        return a / b if b else float("nan")

    return {
        "source": source,
        "sites": len(site_ids),
        "true_fields": int(acc["n_true"]),
        "kept_polygons": int(acc["n_kept"]),
        "precision_kept": ratio(acc["tp_kept"], acc["n_kept"]),
        "recall_kept": ratio(acc["tp_kept"], acc["n_true"]),
        "all_polygons": int(acc["n_all"]),
        "precision_all": ratio(acc["tp_all"], acc["n_all"]),
        "recall_all": ratio(acc["tp_all"], acc["n_true"]),
        "pixel_iou_kept": ratio(acc["i_kept"], acc["u_kept"]),
        "pixel_iou_probability": ratio(acc["i_p"], acc["u_p"]),
    }


def _role_matches(sites: pd.DataFrame, site_id: str, source: str) -> bool:
    role = sites.loc[site_id, "role"]
    return (source == "unlabelled" and role == "unlabelled") or (source != "unlabelled" and role == "single")


def load_truth(root: str | Path) -> gpd.GeoDataFrame:
    return gpd.read_parquet(Path(root) / "truth" / "fields.parquet")
