"""``<root>/reports/index.html``: every published version with its headline numbers and a trend chart.

Built after publish (the version list changes then) from each version's ``metrics.json`` only. Files are
replaced atomically, so a reader never sees half an index.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from tasks.report import plots
from tasks.report.diff import load_metrics
from tasks.report.html import STYLE, environment, render_page
from tasks.report.metrics import HEADLINE
from tasks.report.pages import fig, fmt, h2, para, table
from tasks.store.versions import VersionStore

INDEX_COLUMNS = [
    "sites",
    "labelled_sites",
    "polygons",
    "labellers",
    "pooled_gold_iou",
    "mean_site_risk",
    "risky_site_share",
    "trusted_share",
    "nodata_share",
]
TREND = [
    "labelled_sites",
    "polygons",
    "pooled_gold_iou",
    "mean_site_risk",
    "risky_site_share",
    "trusted_share",
]


def build_reports_index(
    root: str | Path, report_uri: str = "report", metrics_uri: str = "metrics.json"
) -> Path:
    """Write ``<root>/reports/index.html`` (``root`` = dataset root, or its ``versions`` folder)."""
    root = Path(root)
    if root.name == "versions" and not (root / "versions").exists():
        root = root.parent
    store = VersionStore(root)
    labels = {k: (lab, f) for k, lab, f, _ in HEADLINE}
    rows, series, name = [], [], root.name
    for vid in store.list():
        vdir = store.version_path(vid)
        m = load_metrics(vdir, metrics_uri)
        man = load_metrics(vdir, "manifest.json") or {}
        has_report = (vdir / report_uri / "index.html").is_file()
        link = {"text": vid, "href": f"../versions/{vid}/{report_uri}/index.html"} if has_report else vid
        h = (m or {}).get("headline", {})
        name = (m or {}).get("catalog", {}).get("name") or name
        rows.append(
            [
                link,
                man.get("created_at") or (m or {}).get("created_at") or "–",
                *(fmt(h.get(k), labels[k][1]) for k in INDEX_COLUMNS),
                fmt(len((m or {}).get("alerts", [])), "int") if m else "no report",
            ]
        )
        series.append({"version_id": vid, "headline": h})
    out = root / "reports"
    work = root / f".reports-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    try:
        trend = plots.trend(series, [(k, labels[k][0]) for k in TREND], work)
        blocks = [
            para(
                f"{len(rows)} published version(s) under {store.dir}, oldest first. Follow a version id to "
                "its report."
            ),
            h2("Versions"),
            table(["version", "created", *(labels[k][0] for k in INDEX_COLUMNS), "alerts"], rows),
            h2("Trend"),
            fig(
                trend,
                "trend of headline metrics across versions",
                "x axis: version number in the table above.",
            ),
        ]
        (work / "assets").mkdir()
        shutil.copyfile(STYLE, work / "assets" / "style.css")
        render_page(
            environment(),
            work / "index.html",
            title="Reports",
            dataset=name,
            root="",
            subtitle=f"{len(rows)} version(s)",
            home="index.html",
            blocks=blocks,
        )
        (out / "assets").mkdir(parents=True, exist_ok=True)
        for p in sorted(work.rglob("*")):
            if p.is_file():
                dst = out / p.relative_to(work)
                tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:6]}.tmp")
                shutil.copyfile(p, tmp)
                os.replace(tmp, dst)
        if trend is None and (out / "trend.svg").exists():
            (out / "trend.svg").unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out / "index.html"
