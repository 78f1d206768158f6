"""The report stage: a version's artifacts → ``metrics.json`` → ``report/`` (static site), and the
cross-version ``<root>/reports/index.html``.

Runs inside the draft before publish, so provenance comes from the caller (the manifest is not written
yet). Pages are rendered from the metrics dict only, so every number on them is in ``metrics.json``.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from schemas.catalog import Catalog
from tasks.report import pages, pages_dataset, pages_quality, plots
from tasks.report.alerts import alerts
from tasks.report.diff import changes, fingerprints, load_metrics
from tasks.report.extras import issue_geometries, label_issues_section, pseudo_labels_section
from tasks.report.html import copy_static, environment, render_page
from tasks.report.imagery import band_histograms, scene_footprints
from tasks.report.load import Artifacts, scene_paths
from tasks.report.metrics import (
    COMPONENTS,
    MEASURES,
    consensus_section,
    headline,
    imagery_tables,
    labels_section,
    quality_section,
    sizes,
)
from tasks.report.params import ReportSettings, report_settings
from tasks.report.properties import properties_section
from tasks.report.thumbs import field_probability, read_band, site_panels
from tasks.store.artifacts import bytes_hash, file_hash
from tasks.store.grid import SiteGrid
from tasks.store.stage_result import StageResult
from tasks.store.versions import DRAFT_PREFIX, MANIFEST

SCHEMA_VERSION = 1
BUILDERS = {
    "index.html": pages.overview,
    "provenance.html": pages.provenance,
    "imagery.html": pages.imagery,
    "labels.html": pages.labels,
    "quality.html": pages_quality.quality,
    "consensus.html": pages_quality.consensus,
    "issues.html": pages_dataset.issues,
    "pseudo.html": pages_dataset.pseudo,
    "properties.html": pages_dataset.properties,
    "changes.html": pages_dataset.changes,
    "use.html": pages_dataset.use,
}


@dataclass
class ReportStageResult(StageResult):
    report: str = ""
    headline: dict = field(default_factory=dict)
    alerts: list[dict] = field(default_factory=list)


def _uri(catalog: Catalog | None, name: str, default: str) -> str:
    ds = catalog.datasets.get(name) if catalog is not None else None
    return ds.uri if ds is not None else default


def version_id_of(version_dir: Path) -> str:
    return version_dir.name.removeprefix(DRAFT_PREFIX)


def table_metrics(art: Artifacts, catalog: Catalog, s: ReportSettings) -> dict:
    """Every section that needs tables only (cheap: also used for a previous version without metrics)."""
    m = {
        "sizes": sizes(art),
        "labels": labels_section(art, s.max_table_rows),
        "quality": quality_section(art, catalog.settings.consensus),
        "consensus": consensus_section(art, s),
        "imagery": imagery_tables(art),
        "label_issues": label_issues_section(art, s.n_issues),
        "pseudo_labels": pseudo_labels_section(art, s.n_examples),
        "fingerprints": fingerprints(art),
    }
    m["headline"] = headline(m)
    return m


def previous_metrics(
    catalog: Catalog, prev_dir: Path | None, s: ReportSettings, notes: list[str]
) -> dict | None:
    if prev_dir is None:
        return None
    prev_dir = Path(prev_dir)
    m = load_metrics(prev_dir, _uri(catalog, "metrics", "metrics.json"))
    if m is not None:
        return m
    try:
        m = table_metrics(Artifacts(catalog, prev_dir), catalog, s)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        notes.append(f"previous version {prev_dir.name} could not be compared: {exc}")
        return None
    man = load_metrics(prev_dir, MANIFEST) or {}
    return {**m, "version_id": prev_dir.name, "created_at": man.get("created_at")}


def run_report_stage(
    catalog: Catalog,
    version_dir: str | Path,
    previous_version_dir: str | Path | None = None,
    provenance: dict | None = None,
    version_id: str | None = None,
) -> ReportStageResult:
    """Write ``metrics.json`` and ``report/`` into ``version_dir`` (a draft or a published version)."""
    version_dir = Path(version_dir)
    s = report_settings(catalog.settings.report)
    art = Artifacts(catalog, version_dir)
    scenes = scene_paths(catalog)
    notes: list[str] = []
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    m = {
        "schema_version": SCHEMA_VERSION,
        "version_id": version_id or version_id_of(version_dir),
        "created_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "catalog": {
            "name": catalog.name,
            "description": catalog.description.strip(),
            "intended_use": catalog.intended_use.strip(),
            "limitations": catalog.limitations.strip(),
        },
        "settings": s.model_dump(),
    }
    m.update(table_metrics(art, catalog, s))
    if not scenes:
        notes.append("imagery inputs not found: no band histograms, thumbnails show no image")
    m["imagery"]["band_histograms"] = band_histograms(scenes)
    t["metrics"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    m["properties"] = properties_section(art, scenes, s, m["consensus"])
    t["properties"] = time.perf_counter() - t1
    prev = previous_metrics(catalog, previous_version_dir, s, notes)
    m["changes"] = changes(m, prev, s.max_table_rows)
    m["provenance"] = provenance if provenance is not None else (load_metrics(version_dir, MANIFEST) or {})
    m["missing_artifacts"] = sorted(set(art.missing))
    m["alerts"] = alerts(m, prev, s, art.missing)
    notes += [f"{k} unreadable: {v}" for k, v in art.unreadable.items()]

    out = version_dir / _uri(catalog, "report", "report")
    if out.exists():
        shutil.rmtree(out)
    (out / "figures").mkdir(parents=True)
    t2 = time.perf_counter()
    m["assets"] = {"figures": _figures(art, m, scenes, out / "figures")}
    t["figures"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    m["assets"].update(_thumbnails(art, m, scenes, s, catalog, out / "thumbs"))
    t["thumbnails"] = time.perf_counter() - t3
    t4 = time.perf_counter()
    sizes_ = write_site(m, out)
    metrics_path = version_dir / _uri(catalog, "metrics", "metrics.json")
    metrics_path.write_text(json.dumps(m, indent=1, sort_keys=False, default=str), encoding="utf-8")
    t["pages"] = time.perf_counter() - t4
    big = [p for p, n in sizes_.items() if n > 2_000_000]
    if big:
        notes.append(f"pages over 2 MB: {', '.join(big)}")
    files = sorted(p for p in out.rglob("*") if p.is_file())
    artifacts = {
        "report": {
            "path": out.name,
            "rows": len(files),
            "checksum": bytes_hash(*(file_hash(p).encode() for p in files)),
        },
        "metrics": {"path": metrics_path.name, "rows": 1, "checksum": file_hash(metrics_path)},
    }
    counts = {
        "report_pages": len(sizes_),
        "report_files": len(files),
        "report_bytes": sum(p.stat().st_size for p in files),
        "report_alerts": len(m["alerts"]),
    }
    return ReportStageResult(artifacts, t, counts, notes, str(out / "index.html"), m["headline"], m["alerts"])


def _figures(art: Artifacts, m: dict, scenes: dict, out: Path) -> dict[str, str]:
    sites = art.table("sites")
    risk = {r["site_id"]: r["mean_risk"] for r in m["consensus"]["sites"] if r.get("role") != "gold"}
    made = {
        "map_coverage": plots.coverage_map(scene_footprints(scenes), sites, out),
        "map_risk": plots.risk_map(sites, risk, out),
        "bands": plots.band_histograms(m["imagery"]["band_histograms"], out),
        "tile_quality": plots.tile_quality(m["imagery"], out),
        "label_counts": plots.label_counts(m["labels"], out),
        "polygon_area": plots.area_hist(m["labels"], out),
        "leaderboard": plots.leaderboard(m["quality"], out),
        "components": plots.components(m["quality"], {k: dict(MEASURES)[k] for k in COMPONENTS}, out),
        "drift": plots.drift(m["quality"], out),
        "confusion": plots.confusion(m["quality"], out),
        "risk_distribution": plots.risk_distribution(m["consensus"], out),
        "pseudo_confidence": plots.histogram(
            m["pseudo_labels"].get("confidence_hist"), "confidence", out, "pseudo_confidence.svg"
        ),
        "balance": plots.balance(m["properties"], out),
    }
    return {k: f"figures/{v}" for k, v in made.items() if v}


def _thumbnails(art, m, scenes, s: ReportSettings, catalog: Catalog, out: Path) -> dict[str, list]:
    sites = art.table("sites").set_index("site_id", drop=False)
    bands = list(art.table("tiles")["band_names"].iloc[0]) if len(art.table("tiles")) else []
    classes = list(catalog.settings.label_classes)
    labels, cons = art.table("labels"), art.table("consensus_labels")
    band_range = _band_range(art.table("tiles"))
    by_site = {k: g for k, g in labels.groupby("site_id")} if len(labels) else {}
    cons_by_site = {k: g for k, g in cons.groupby("site_id")} if len(cons) else {}

    def panels(site_id, who: str | None = None, **kw):
        """Panels of a site; ``who``: None = every labeller, "" = no labeller panel, else one labeller."""
        if site_id not in sites.index:
            return None
        row = sites.loc[site_id]
        polys = None
        if who != "":
            lab = by_site.get(site_id, labels.iloc[:0])
            if who is not None:
                lab = lab[lab["labeller_id"].astype(str) == who]
            polys = {
                str(k): list(zip(g["label"], g["geometry"], strict=True))
                for k, g in lab.groupby("labeller_id")
            }
            if who is not None:
                polys.setdefault(who, [])
        return site_panels(
            SiteGrid.from_row(row),
            scenes.get(str(row["scene_id"])),
            bands,
            out,
            "thumbs",
            classes,
            s.thumb_px,
            labeller_polys=polys,
            band_range=band_range,
            **kw,
        )

    def cons_polys(site_id):
        c = cons_by_site.get(site_id)
        return [] if c is None else list(zip(c["class"], c["geometry"], strict=True))

    riskiest = []
    for sid in m["consensus"]["riskiest"]:
        risk = read_band(art.raster_path("consensus_rasters", sid), 2, s.thumb_px)
        p = panels(sid, overlays={"consensus": cons_polys(sid)}, heat_values=("risk", risk, 0.5, "magma"))
        if p:
            riskiest.append(p)
    issues = []
    for i, r in enumerate(m["label_issues"].get("top", []) or []):
        sid = r.get("site_id")
        if sid is None:
            continue
        who = r.get("labeller_id")
        p = panels(sid, who=who, overlays={"issue": issue_geometries(art, sid, who)})
        if p:
            issues.append({**p, "rank": i + 1, "labeller_id": r.get("labeller_id")})
    pseudo = []
    pl = art.table("pseudo_labels")
    for sid in m["pseudo_labels"].get("examples", []) or []:
        prob = field_probability(art.raster_path("pseudo_probabilities", sid), s.thumb_px)
        over = {}
        if pl is not None and "geometry" in pl and "site_id" in pl:
            g = pl[pl["site_id"].astype(str) == sid]
            g = g[g["kept"].astype(bool)] if "kept" in g else g
            cls = g["class"] if "class" in g else pd.Series([None] * len(g), index=g.index)
            over["pseudo"] = list(zip(cls, g["geometry"], strict=True))
        p = panels(sid, who="", overlays=over, heat_values=("probability", prob, 1.0, "viridis"))
        if p:
            pseudo.append(p)
    return {"riskiest": riskiest, "issues": issues, "pseudo": pseudo}


def _band_range(tiles: pd.DataFrame) -> tuple | None:
    """Region-wide stretch: per band, the median over tiles of each tile's 2nd and 98th percentile."""
    if not len(tiles):
        return None
    n = len(tiles["band_names"].iloc[0])
    lo = [float(np.nanmedian([v[i] for v in tiles["p02"]])) for i in range(n)]
    hi = [float(np.nanmedian([v[i] for v in tiles["p98"]])) for i in range(n)]
    return lo, hi


def write_site(m: dict, out: Path) -> dict[str, int]:
    """Render every page from ``m``; return page sizes in bytes."""
    copy_static(out)
    env = environment()
    sub = f"version {m['version_id']} · report built {m['created_at']}"
    nav = [(href, label) for href, label in pages.PAGES]
    return {
        name: render_page(
            env,
            out / name,
            title=dict(pages.PAGES)[name],
            dataset=m["catalog"]["name"],
            subtitle=sub,
            root="",
            home="../../../reports/index.html",
            nav=nav,
            current=name,
            blocks=build(m),
            footer="Every number on these pages is read from this version's metrics.json.",
        )
        for name, build in BUILDERS.items()
    }
