"""Aggregates of a version's artifacts: the sections of ``metrics.json`` that need only tables.

Every number the pages print comes from here (or from the imagery/properties/extras sections), so the
site and ``metrics.json`` can never disagree. Aggregates only: no label row is copied into the output.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from tasks.report.load import Artifacts
from tasks.report.params import REFERENCE_RISK, ReportSettings

# (key, label, format, which direction is better) — the numbers compared across versions.
HEADLINE = [
    ("sites", "Sites", "int", None),
    ("labelled_sites", "Labelled sites", "int", "up"),
    ("gold_sites", "Gold sites", "int", "up"),
    ("polygons", "Polygons", "int", None),
    ("labellers", "Labellers", "int", None),
    ("pooled_gold_iou", "Pooled gold IoU", "f3", "up"),
    ("mean_lacuna_score", "Mean Lacuna score", "f3", "up"),
    ("trusted_share", "Trusted labellers", "pct", "up"),
    ("mean_site_risk", "Mean site risk", "f3", "down"),
    ("risky_site_share", "Risky sites", "pct", "down"),
    ("mean_pairwise_iou", "Mean pairwise IoU", "f3", "up"),
    ("item_mean_posterior", "Item consensus posterior", "f3", "up"),
    ("nodata_share", "Nodata share", "pct", "down"),
    ("cloud_share", "Cloud share", "pct", "down"),
    ("label_issues", "Label issues", "int", "down"),
    ("pseudo_label_coverage", "Pseudo-label coverage", "pct", "up"),
]
MEASURES = [
    ("lacuna_score", "Lacuna score"),
    ("lacuna_area", "Area"),
    ("lacuna_n", "N"),
    ("lacuna_edge", "Edge"),
    ("lacuna_categorical", "Categorical"),
    ("iou", "IoU"),
    ("boundary_f", "Boundary F"),
    ("tss", "TSS"),
]
COMPONENTS = ["lacuna_area", "lacuna_n", "lacuna_edge", "lacuna_categorical", "iou", "boundary_f"]
UNCLASSED = "(unclassed)"


def num(x) -> float | int | None:
    """A JSON-safe number: numpy scalars unwrapped, NaN/inf → None."""
    if x is None or x is pd.NA or x is pd.NaT:
        return None
    if isinstance(x, bool | np.bool_):
        return bool(x)
    if isinstance(x, int | np.integer):
        return int(x)
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def quartiles(s: pd.Series) -> list[float | None]:
    s = pd.to_numeric(s, errors="coerce").dropna()
    return [num(s.quantile(q)) for q in (0.25, 0.5, 0.75)] if len(s) else [None, None, None]


def histogram(values, edges) -> dict:
    v = np.asarray(pd.to_numeric(pd.Series(values), errors="coerce").dropna(), dtype=float)
    counts, edges = np.histogram(v, bins=edges)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def _mean(s) -> float | None:
    s = pd.to_numeric(pd.Series(s), errors="coerce").dropna()
    return num(s.mean()) if len(s) else None


def sizes(art: Artifacts) -> dict:
    sites, tiles, asg = art.table("sites"), art.attributes("tiles"), art.table("assignments")
    labels, sc = art.attributes("labels"), art.table("site_consensus")
    cl, items = art.attributes("consensus_labels"), art.table("item_consensus")
    done = asg[asg["status"] == "completed"]
    crowd = done[~done["is_reference"].astype(bool)]
    return {
        "scenes": int(tiles["scene_id"].nunique()),
        "tiles": len(tiles),
        "sites": len(sites),
        "sites_by_role": {r: int(n) for r, n in sites["role"].value_counts().sort_index().items()},
        "labelled_sites": int((sites["role"] != "unlabelled").sum()),
        "polygons": len(labels),
        "assignments": len(asg),
        "completed_assignments": len(done),
        "pending_assignments": int((asg["status"] == "pending").sum()),
        "no_field_assignments": int((done["n_polygons"] == 0).sum()),
        "labellers": int(crowd["labeller_id"].nunique()),
        "reference_labellers": int(done.loc[done["is_reference"].astype(bool), "labeller_id"].nunique()),
        "consensus_sites": len(sc),
        "consensus_polygons": len(cl),
        "items": 0 if items is None else len(items),
    }


def labels_section(art: Artifacts, max_rows: int) -> dict:
    sites, asg, labels = art.table("sites"), art.table("assignments"), art.attributes("labels")
    role = sites.set_index("site_id")["role"]
    lab = labels.assign(label=labels["label"].fillna(UNCLASSED), role=labels["site_id"].map(role))
    asg = asg.assign(role=asg["site_id"].map(role))
    done = asg[asg["status"] == "completed"]
    by_class = lab.groupby("label").agg(polygons=("polygon_id", "size"), area_ha=("area_m2", "sum"))
    by_class["area_ha"] /= 1e4
    by_role = {
        str(r): {
            "sites": int((sites["role"] == r).sum()),
            "completed_assignments": int((done["role"] == r).sum()),
            "polygons": int((lab["role"] == r).sum()),
        }
        for r in ("gold", "multi", "single", "unlabelled")
    }
    area = lab["area_m2"].to_numpy(dtype=float)
    if len(area):
        lo, hi = np.floor(np.log10(area.min())), np.ceil(np.log10(area.max()))
        edges = np.logspace(lo, max(hi, lo + 1), 25)
        area_q = {f"p{q}": num(np.percentile(area, q) / 1e4) for q in (5, 25, 50, 75, 95)}
    else:
        edges, area_q = np.array([1.0, 10.0]), {}
    nofield = _no_field_sites(done, dict(zip(sites["site_id"], sites["role"], strict=True)))
    return {
        "by_class": [
            {"label": str(k), "polygons": int(r.polygons), "area_ha": num(r.area_ha)}
            for k, r in by_class.iterrows()
        ],
        "by_labeller": _by_labeller(asg, done, lab),
        "by_role": by_role,
        "area_ha_quantiles": area_q,
        "area_m2_hist": histogram(area, edges),
        "repaired_polygons": int((~labels["was_valid"].astype(bool)).sum()) if len(labels) else 0,
        "no_field_sites": {
            "n_any": len(nofield),
            "n_all": sum(1 for r in nofield if not r["drew_fields"]),
            "sites": nofield[:max_rows],
        },
    }


def _counts(df: pd.DataFrame, by: str, col: str) -> dict:
    """Per value of ``by``: {value of ``col`` as text: rows}, in sorted order (missing values dropped, as
    ``value_counts`` does) -- one grouping for all labellers instead of a filter each."""
    out: dict = {}
    for (k, v), n in df.groupby([by, col], sort=True).size().items():
        out.setdefault(k, {})[str(v)] = int(n)
    return out


def _by_labeller(asg: pd.DataFrame, done: pd.DataFrame, lab: pd.DataFrame) -> list[dict]:
    """Per labeller (sorted): assignments by status, polygons, polygons by class, completed by role."""
    flags = pd.DataFrame(
        {
            "labeller_id": asg["labeller_id"],
            "is_reference": asg["is_reference"],
            "completed": asg["status"] == "completed",
            "pending": asg["status"] == "pending",
            "no_fields": (asg["status"] == "completed") & (asg["n_polygons"] == 0),
        }
    )
    per = flags.groupby("labeller_id", sort=True).agg(
        is_reference=("is_reference", "any"),
        assigned=("completed", "size"),
        completed=("completed", "sum"),
        pending=("pending", "sum"),
        no_fields=("no_fields", "sum"),
    )
    polygons = lab.groupby("labeller_id").size()
    by_class, by_role = _counts(lab, "labeller_id", "label"), _counts(done, "labeller_id", "role")
    return [
        {
            "labeller_id": str(lid),
            "is_reference": bool(r.is_reference),
            "assigned": int(r.assigned),
            "completed": int(r.completed),
            "pending": int(r.pending),
            "no_fields": int(r.no_fields),
            "polygons": int(polygons.get(lid, 0)),
            "by_class": by_class.get(lid, {}),
            "by_role": by_role.get(lid, {}),
        }
        for lid, r in zip(per.index, per.itertuples(), strict=True)
    ]


def _no_field_sites(done: pd.DataFrame, role: dict) -> list[dict]:
    """Sites where a labeller said "no fields here" (completed with no polygon), by site id, with who
    said so and who drew fields there; one pass over the completed assignments."""
    said: dict = {}
    drew: dict = {}
    n_poly = done["n_polygons"].to_numpy()
    for sid, lid, n in zip(done["site_id"].tolist(), done["labeller_id"].tolist(), n_poly, strict=True):
        if n == 0:
            said.setdefault(sid, []).append(str(lid))
        elif n > 0:
            drew.setdefault(sid, []).append(str(lid))
    return [
        {
            "site_id": str(sid),
            "role": str(role.get(sid, "")),
            "said_no_fields": sorted(said[sid]),
            "drew_fields": sorted(drew.get(sid, [])),
        }
        for sid in sorted(said)
    ]


def quality_section(art: Artifacts, consensus_settings: dict) -> dict:
    lq, aq = art.table("labeller_quality"), art.table("assignment_quality")
    trust = str(consensus_settings.get("trust_measure", "lacuna_score"))
    rank_by = "latent_iou" if "latent_iou" in lq and lq["latent_iou"].notna().any() else "iou_mean"
    board = []
    for r in lq.to_dict("records"):
        row = {"labeller_id": str(r["labeller_id"]), "n_gold": num(r.get("n_gold"))}
        for m, _ in MEASURES:
            for s in ("mean", "lo", "hi"):
                row[f"{m}_{s}"] = num(r.get(f"{m}_{s}"))
        for k in (
            "rolling_score",
            "drift_slope_per_day",
            "drift_p_value",
            "latent_iou",
            "latent_sensitivity",
            "latent_specificity",
            "iou_pooled",
        ):
            row[k] = num(r.get(k))
        row["trusted"] = bool(r.get("trusted", False))
        board.append(row)
    board.sort(key=lambda r: (r[rank_by] is None, -(r[rank_by] or 0.0), r["labeller_id"]))
    drift = []
    if len(aq) and trust in aq:
        for lid, g in aq.sort_values("completed_at").groupby("labeller_id", sort=True):
            when = pd.to_datetime(g["completed_at"], utc=True)
            drift.append(
                {
                    "labeller_id": str(lid),
                    "points": [
                        [t.strftime("%Y-%m-%d") if pd.notna(t) else None, num(v)]
                        for t, v in zip(when, g[trust], strict=True)
                    ],
                }
            )
    ilq, conf, ic = (
        art.table("item_labeller_quality"),
        art.table("item_confusion"),
        art.table("item_consensus"),
    )
    items = []
    if ilq is not None:
        for r in ilq.sort_values("labeller_id").to_dict("records"):
            items.append(
                {k: (num(v) if k not in ("labeller_id", "accuracy_basis") else str(v)) for k, v in r.items()}
            )
    confusion = []
    if conf is not None and len(conf):
        classes = sorted(set(conf["true_label"]) | set(conf["given_label"]), key=str)
        for lid, g in conf.groupby("labeller_id", sort=True):
            m = g.pivot_table(index="true_label", columns="given_label", values="probability", aggfunc="sum")
            m = m.reindex(index=classes, columns=classes).fillna(0.0)
            confusion.append(
                {
                    "labeller_id": str(lid),
                    "classes": list(map(str, classes)),
                    "matrix": [[round(float(v), 4) for v in row] for row in m.to_numpy()],
                }
            )
    pooled = None
    if len(aq):
        tp, fp, fn = aq["tp_m2"].sum(), aq["fp_m2"].sum(), aq["fn_m2"].sum()
        pooled = num(tp / (tp + fp + fn)) if tp + fp + fn > 0 else None
    return {
        "rank_by": rank_by,
        "trust_measure": trust,
        "trust_threshold": num(consensus_settings.get("trust_threshold", 0.45)),
        "gold_assignments": len(aq),
        "pooled_gold_iou": pooled,
        "mean_lacuna_score": _mean(aq["lacuna_score"]) if len(aq) else None,
        "leaderboard": board,
        "drift": drift,
        "item_quality": items,
        "item_mean_posterior": _mean(ic["posterior"]) if ic is not None and len(ic) else None,
        "item_confusion": confusion,
    }


def consensus_section(art: Artifacts, settings: ReportSettings) -> dict:
    sc, cl = art.table("site_consensus"), art.attributes("consensus_labels")
    cols = [
        "site_id",
        "role",
        "n_labellers",
        "method",
        "mean_risk",
        "risky_fraction",
        "field_fraction",
        "mean_pairwise_iou",
        "fleiss_kappa",
        "krippendorff_alpha",
    ]
    sites = [
        {k: (str(r[k]) if k in ("site_id", "role", "method") else num(r[k])) for k in cols if k in r}
        for r in sc.sort_values("site_id").to_dict("records")
    ]
    ng = sc[sc["role"] != "gold"]
    multi = sc[sc["n_labellers"] >= 2]
    risky = ng["mean_risk"] > settings.risky_site_mean_risk
    top = ng.sort_values(["mean_risk", "risky_fraction", "site_id"], ascending=[False, False, True])
    classes = cl["class"].fillna(UNCLASSED) if len(cl) else pd.Series(dtype=object)
    px = cl["n_pixels"] if "n_pixels" in cl else pd.Series(1, index=cl.index)
    return {
        "n_sites": len(sc),
        "n_scored_sites": len(ng),
        "methods": {str(k): int(v) for k, v in sc["method"].value_counts().items()},
        "mean_risk_quartiles": quartiles(ng["mean_risk"]),
        "risky_fraction_quartiles": quartiles(ng["risky_fraction"]),
        "mean_site_risk": _mean(ng["mean_risk"]),
        "risky_site_share": num(risky.mean()) if len(ng) else None,
        "risky_site_threshold": settings.risky_site_mean_risk,
        "reference": REFERENCE_RISK,
        "mean_risk_hist": histogram(ng["mean_risk"], np.linspace(0, 0.5, 21)),
        "risky_fraction_hist": histogram(ng["risky_fraction"], np.linspace(0, 1, 21)),
        "agreement": {
            "sites": len(multi),
            "mean_pairwise_iou": _mean(multi["mean_pairwise_iou"]),
            "fleiss_kappa": _mean(multi["fleiss_kappa"]),
            "krippendorff_alpha": _mean(multi["krippendorff_alpha"]),
        },
        "polygons_by_class": {str(k): int(v) for k, v in classes.value_counts().sort_index().items()},
        "pixels_by_class": {str(k): int(v) for k, v in px.groupby(classes).sum().sort_index().items()},
        "sites": sites,
        "riskiest": [str(s) for s in top["site_id"].head(settings.n_riskiest)],
    }


def imagery_tables(art: Artifacts) -> dict:
    tiles = art.attributes("tiles")
    cols = ["nodata_fraction", "cloud_fraction", "valid_fraction"]
    per_scene = tiles.groupby("scene_id", sort=True).agg(
        tiles=("site_id", "size"),
        **{f"mean_{c}": (c, "mean") for c in cols},
        max_nodata=("nodata_fraction", "max"),
    )
    names = list(tiles["band_names"].iloc[0]) if len(tiles) else []
    bands = []
    for i, b in enumerate(names):
        take = {
            s: tiles[s].map(lambda v, i=i: v[i] if v is not None and len(v) > i else np.nan)
            for s in ("p02", "p50", "p98")
        }
        bands.append({"band": str(b), **{f"median_{s}": _mean([np.nanmedian(take[s])]) for s in take}})
    return {
        "nodata_share": _mean(tiles["nodata_fraction"]),
        "cloud_share": _mean(tiles["cloud_fraction"]),
        "scenes": [
            {"scene_id": str(k), **{c: num(v) for c, v in r.items()}} for k, r in per_scene.iterrows()
        ],
        "tiles": [
            {"site_id": str(r.site_id), "scene_id": str(r.scene_id), **{c: num(getattr(r, c)) for c in cols}}
            for r in tiles.sort_values(["scene_id", "site_id"]).itertuples()
        ],
        "band_names": list(map(str, names)),
        "band_stats": bands,
    }


def headline(m: dict) -> dict:
    s, q, c = m["sizes"], m["quality"], m["consensus"]
    board = q["leaderboard"]
    return {
        "sites": s["sites"],
        "labelled_sites": s["labelled_sites"],
        "gold_sites": s["sites_by_role"].get("gold", 0),
        "polygons": s["polygons"],
        "labellers": s["labellers"],
        "pooled_gold_iou": q["pooled_gold_iou"],
        "mean_lacuna_score": q["mean_lacuna_score"],
        "trusted_share": num(np.mean([r["trusted"] for r in board])) if board else None,
        "mean_site_risk": c["mean_site_risk"],
        "risky_site_share": c["risky_site_share"],
        "mean_pairwise_iou": c["agreement"]["mean_pairwise_iou"],
        "item_mean_posterior": q["item_mean_posterior"],
        "nodata_share": m["imagery"]["nodata_share"],
        "cloud_share": m["imagery"]["cloud_share"],
        "label_issues": m["label_issues"].get("n_issues"),
        "pseudo_label_coverage": m["pseudo_labels"].get("coverage"),
    }
