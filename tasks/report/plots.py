"""Figures of the report (matplotlib, drawn from ``metrics.json`` sections; maps from the GeoParquet sites).

SVG with text kept as text (small, crisp, escaped by matplotlib's XML writer) for charts; PNG for maps,
whose many polygons would make SVG heavy. Mathtext is off so a labeller called ``$x$`` stays literal.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

STYLE = {
    "svg.fonttype": "none",
    "svg.hashsalt": "labelrefinery",
    "text.parse_math": False,
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 9,
    "figure.dpi": 100,
    "figure.subplot.wspace": 0.4,
    "figure.subplot.hspace": 0.6,
}
ROLE_COLOURS = {"gold": "#d4a017", "multi": "#2563eb", "single": "#60a5fa", "unlabelled": "#d1d5db"}
MAX_PANELS = 24
MAX_BOARD = 40  # leaderboard rows drawn
MAX_COMPONENTS = 30  # leaderboard rows in the components chart


def save(fig, out_dir: Path, name: str) -> str:
    fmt = name.rsplit(".", 1)[-1]
    meta = {"Date": None} if fmt == "svg" else {"Software": None}
    (out_dir / name).unlink(missing_ok=True)  # a new file: never write through a link to a previous one
    fig.savefig(out_dir / name, format=fmt, bbox_inches="tight", metadata=meta, dpi=100)
    plt.close(fig)
    return name


def drawn(fn: Callable) -> Callable:
    """Run a figure function under the report style; a figure with nothing to show returns None."""

    def wrap(*args, **kwargs):
        with plt.rc_context(STYLE):
            return fn(*args, **kwargs)

    wrap.__name__ = fn.__name__
    return wrap


def _grid(n: int, cols: int = 4, w: float = 2.4, h: float = 1.9):
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False)
    fig.subplots_adjust(wspace=0.35, hspace=0.75)  # fixed spacing: constrained layout doubles drawing time
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat


def _lonlat_aspect(ax, gdf) -> None:
    lat = float(np.mean(gdf.total_bounds[[1, 3]])) if len(gdf) else 0.0
    ax.set_aspect(1 / max(math.cos(math.radians(lat)), 0.05))
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")


@drawn
def coverage_map(scenes, sites, out: Path) -> str | None:
    import geopandas as gpd

    if not len(sites):
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if scenes:
        fp = gpd.GeoSeries([g for _, g in scenes], crs=4326)
        fp.boundary.plot(ax=ax, color="#374151", linewidth=1)
        for sid, g in scenes:
            ax.annotate(sid, (g.bounds[0], g.bounds[3]), fontsize=7, va="bottom", color="#374151")
    for role, colour in ROLE_COLOURS.items():
        part = sites[sites["role"] == role]
        if len(part):
            part.plot(ax=ax, color=colour, edgecolor="#111827", linewidth=0.3, label=f"{role} ({len(part)})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, title="site role")
    _lonlat_aspect(ax, sites)
    return save(fig, out, "map_coverage.png")


@drawn
def risk_map(sites, risk: dict[str, float], out: Path) -> str | None:
    if not len(sites):
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    v = sites["site_id"].map(risk)
    sites[v.isna()].plot(ax=ax, color="#f3f4f6", edgecolor="#9ca3af", linewidth=0.3)
    scored = sites.assign(risk=v)[v.notna()]
    if len(scored):
        scored.plot(
            ax=ax,
            column="risk",
            cmap=RISK_CMAP,
            vmin=0,
            vmax=_risk_vmax(v),
            edgecolor="#111827",
            linewidth=0.3,
            legend=True,
            legend_kwds={"label": "mean site risk"},
        )
    _lonlat_aspect(ax, sites)
    ax.set_title("grey: no consensus (unlabelled) or gold")
    return save(fig, out, "map_risk.png")


RISK_CMAP = "magma_r"


def _risk_vmax(v) -> float:
    return max(0.25, float(v.max()))


def risk_map_colours(sites, risk: dict[str, float]) -> list:
    """What ``risk_map`` paints, as its figure's key: per site whether it is scored and its colour (the
    colormap has 256 entries, so most changes of a site's risk leave the picture as it was), the colour
    scale and whether it extends below 0. Geopandas colours the polygons with the collection's own
    ``to_rgba``, which is what this calls; a non-numeric risk column keys the values themselves."""
    v = sites["site_id"].map(risk)
    scored = v.notna().to_numpy()
    if not scored.any():
        return [scored]
    if v.dtype.kind != "f":  # geopandas would draw it as categories
        return [scored, str(v.dtype), [str(x) for x in v]]
    vals, vmax = v.to_numpy()[scored], _risk_vmax(v)
    mappable = ScalarMappable(norm=Normalize(vmin=0, vmax=vmax), cmap=RISK_CMAP)
    return [scored, vmax, np.asarray(mappable.to_rgba(vals), dtype=float), bool((vals < 0).any())]


@drawn
def band_histograms(hists: list[dict], out: Path) -> str | None:
    if not hists:
        return None
    fig, axes = _grid(len(hists), cols=4, w=2.3, h=1.8)
    for ax, h in zip(axes, hists, strict=False):
        e = np.asarray(h["edges"])
        ax.stairs(h["counts"], e, fill=True, color="#6b7280")
        ax.set_title(f"band {h['band']}")
        ax.set_yticks([])
    return save(fig, out, "bands.svg")


@drawn
def tile_quality(imagery: dict, out: Path) -> str | None:
    tiles = imagery["tiles"]
    if not tiles:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 2.8))
    sc = imagery["scenes"]
    x = np.arange(len(sc))
    a.bar(x - 0.2, [s["mean_nodata_fraction"] or 0 for s in sc], 0.4, label="nodata", color="#6b7280")
    a.bar(x + 0.2, [s["mean_cloud_fraction"] or 0 for s in sc], 0.4, label="cloud", color="#93c5fd")
    a.set_xticks(x, [s["scene_id"] for s in sc], rotation=60, ha="right", fontsize=7)
    a.set_ylabel("mean share of tile")
    a.legend(frameon=False)
    a.set_title("per scene")
    b.scatter([t["nodata_fraction"] for t in tiles], [t["cloud_fraction"] for t in tiles], s=8, alpha=0.6)
    b.set_xlabel("nodata fraction")
    b.set_ylabel("cloud fraction")
    b.set_title("per tile")
    return save(fig, out, "tile_quality.svg")


@drawn
def label_counts(labels: dict, out: Path) -> str | None:
    rows = [r for r in labels["by_labeller"] if r["completed"]][:40]
    if not rows:
        return None
    classes = sorted({c for r in rows for c in r["by_class"]})
    fig, (a, b) = plt.subplots(
        1, 2, figsize=(9, 0.6 + 0.28 * len(rows)), gridspec_kw={"width_ratios": [3, 2]}
    )
    y = np.arange(len(rows))
    left = np.zeros(len(rows))
    for c in classes:
        v = np.array([r["by_class"].get(c, 0) for r in rows])
        a.barh(y, v, left=left, label=c)
        left += v
    a.set_yticks(y, [r["labeller_id"] for r in rows])
    a.invert_yaxis()
    a.set_xlabel("polygons")
    a.legend(frameon=False, fontsize=7)
    roles = labels["by_role"]
    b.bar(
        list(roles),
        [v["completed_assignments"] for v in roles.values()],
        color=[ROLE_COLOURS.get(r, "#999") for r in roles],
    )
    b.set_ylabel("completed assignments")
    b.set_title("by site role")
    return save(fig, out, "label_counts.svg")


@drawn
def area_hist(labels: dict, out: Path) -> str | None:
    h = labels["area_m2_hist"]
    if not sum(h["counts"]):
        return None
    fig, ax = plt.subplots(figsize=(6, 2.6))
    ax.stairs(h["counts"], np.asarray(h["edges"]) / 1e4, fill=True, color="#4ade80")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("polygon area (ha, log scale)")
    ax.set_ylabel("polygons")
    return save(fig, out, "polygon_area.svg")


def _interval_rows(board, m):
    return [r for r in board if r.get(f"{m}_mean") is not None][:40]


@drawn
def leaderboard(quality: dict, out: Path) -> str | None:
    rows = quality["leaderboard"][:MAX_BOARD]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 0.7 + 0.3 * len(rows)))
    y = np.arange(len(rows))
    for i, r in enumerate(rows):
        if r["iou_mean"] is not None:
            ax.plot([r["iou_lo"], r["iou_hi"]], [i, i], color="#2563eb", lw=2, alpha=0.5)
            ax.plot(
                r["iou_mean"], i, "o", color="#2563eb", label="gold IoU (90% interval)" if i == 0 else None
            )
        if r["latent_iou"] is not None:
            ax.plot(
                r["latent_iou"], i, "D", color="#d97706", ms=4, label="latent IoU (EM)" if i == 0 else None
            )
    ax.set_yticks(y, [r["labeller_id"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("IoU")
    ax.legend(frameon=False, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2, fontsize=7)
    return save(fig, out, "leaderboard.svg")


@drawn
def components(quality: dict, labels: dict[str, str], out: Path) -> str | None:
    board = quality["leaderboard"][:MAX_COMPONENTS]
    if not any(r.get("iou_mean") is not None for r in board):
        return None
    fig, axes = _grid(len(labels), cols=3, w=3.0, h=0.6 + 0.22 * len(board))
    for ax, (m, title) in zip(axes, labels.items(), strict=False):
        for i, r in enumerate(board):
            if r.get(f"{m}_mean") is not None:
                ax.plot([r[f"{m}_lo"], r[f"{m}_hi"]], [i, i], color="#6b7280", lw=2, alpha=0.5)
                ax.plot(r[f"{m}_mean"], i, "o", color="#111827", ms=3)
        ax.set_yticks(
            range(len(board)),
            [r["labeller_id"] for r in board] if ax.get_subplotspec().is_first_col() else [],
        )
        ax.invert_yaxis()
        ax.set_title(title)
    return save(fig, out, "components.svg")


@drawn
def drift(quality: dict, out: Path) -> str | None:
    series = [d for d in quality["drift"] if any(v is not None for _, v in d["points"])][:MAX_PANELS]
    if not series:
        return None
    import datetime as dt

    dates = [dt.date.fromisoformat(t) for d in series for t, v in d["points"] if t and v is not None]
    t0 = min(dates) if dates else dt.date(2000, 1, 1)
    span = max(((max(dates) - t0).days if dates else 1), 1)
    fig, axes = _grid(len(series), cols=4, w=2.4, h=1.8)
    thr = quality.get("trust_threshold")
    board = {r["labeller_id"]: r for r in quality["leaderboard"]}
    for ax, d in zip(axes, series, strict=False):
        pts = [((dt.date.fromisoformat(t) - t0).days, v) for t, v in d["points"] if t and v is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, color="#2563eb")
        if thr is not None:
            ax.axhline(thr, color="#dc2626", lw=0.8, ls="--")
        slope = board.get(d["labeller_id"], {}).get("drift_slope_per_day")
        ax.set_title(d["labeller_id"] + (f"  ({slope:+.4f}/day)" if slope is not None else ""), fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.set_xlim(-0.03 * span, 1.03 * span)
        ax.set_xlabel(f"days since {t0.isoformat()}", fontsize=7)
    return save(fig, out, "drift.svg")


@drawn
def confusion(quality: dict, out: Path) -> str | None:
    mats = quality["item_confusion"][:MAX_PANELS]
    if not mats:
        return None
    n = len(mats[0]["classes"])
    fig, axes = _grid(len(mats), cols=4, w=0.9 + 0.32 * n, h=0.9 + 0.32 * n)
    for ax, m in zip(axes, mats, strict=False):
        ax.imshow(np.asarray(m["matrix"]), vmin=0, vmax=1, cmap="Blues")
        ax.set_title(m["labeller_id"], fontsize=8)
        ax.set_xticks(range(n), [c[:4] for c in m["classes"]], rotation=90, fontsize=6)
        ax.set_yticks(range(n), [c[:4] for c in m["classes"]], fontsize=6)
    return save(fig, out, "confusion.svg")


@drawn
def risk_distribution(consensus: dict, out: Path) -> str | None:
    if not consensus["n_scored_sites"]:
        return None
    ref = consensus["reference"]
    fig, axes = plt.subplots(1, 3, figsize=(9.5, 2.6))
    for ax, key, title in (
        (axes[0], "mean_risk", "site mean risk"),
        (axes[1], "risky_fraction", "share of risky pixels"),
    ):
        ours, theirs = consensus[f"{key}_quartiles"], ref[f"{key}_quartiles"]
        for i, (q, _name, col) in enumerate(
            ((ours, "this version", "#2563eb"), (theirs, "reference", "#9ca3af"))
        ):
            if q[0] is not None:
                ax.bar(i, q[2] - q[0], bottom=q[0], width=0.5, color=col, alpha=0.7)
                ax.plot([i - 0.25, i + 0.25], [q[1], q[1]], color="#111827", lw=2)
        ax.set_xticks([0, 1], ["this version", "reference"])
        ax.set_title(f"{title}: quartiles")
    h = consensus["mean_risk_hist"]
    axes[2].stairs(h["counts"], h["edges"], fill=True, color="#2563eb", alpha=0.7)
    axes[2].set_xlabel("site mean risk")
    axes[2].set_ylabel("sites")
    return save(fig, out, "risk_distribution.svg")


@drawn
def histogram(h: dict | None, xlabel: str, out: Path, name: str) -> str | None:
    if not h or not sum(h["counts"]):
        return None
    fig, ax = plt.subplots(figsize=(5.5, 2.4))
    ax.stairs(h["counts"], h["edges"], fill=True, color="#7c3aed", alpha=0.75)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    return save(fig, out, name)


@drawn
def balance(props: dict, out: Path) -> str | None:
    sb, cb = props["spatial_balance"]["scenes"], props["class_balance"]
    if not sb:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 2.6))
    x = np.arange(len(sb))
    a.bar(x, [s["sites"] for s in sb], color="#e5e7eb", label="sites")
    a.bar(x, [s["labelled"] for s in sb], color="#2563eb", label="labelled")
    a.bar(x, [s["gold"] for s in sb], color="#d4a017", label="gold")
    a.set_xticks(x, [s["scene_id"] for s in sb], rotation=60, ha="right", fontsize=7)
    a.legend(frameon=False, fontsize=7)
    a.set_title("sites per scene")
    items = cb.get("item_classes", {})
    if items:
        b.bar(list(items), list(items.values()), color="#4ade80")
        b.tick_params(axis="x", labelrotation=45)
    b.set_title("image-level consensus classes")
    return save(fig, out, "balance.svg")


@drawn
def trend(rows: list[dict], keys: list[tuple[str, str]], out: Path) -> str | None:
    rows = [r for r in rows if r.get("headline")]
    if not rows:
        return None
    fig, axes = _grid(len(keys), cols=3, w=3.0, h=1.9)
    x = np.arange(1, len(rows) + 1)
    # a year of nightly versions: a few integer ticks and no markers keep the chart (and the time to draw
    # it, paid by every refresh) the same size as for ten versions
    style = "o-" if len(rows) <= 20 else "-"
    for ax, (k, label) in zip(axes, keys, strict=False):
        y = [r["headline"].get(k) for r in rows]
        ax.plot(x, [np.nan if v is None else v for v in y], style, ms=3)
        ax.set_title(label)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True, min_n_ticks=1))
        ax.tick_params(axis="x", labelsize=6)
        ax.set_xlabel("version #", fontsize=7)
    return save(fig, out, "trend.svg")
