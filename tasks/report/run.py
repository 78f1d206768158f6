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

import matplotlib
import numpy as np

from schemas.catalog import Catalog
from tasks.report import pages, pages_dataset, pages_quality, plots
from tasks.report.alerts import alerts
from tasks.report.diff import changes, fingerprints, load_metrics
from tasks.report.extras import label_issues_section, pseudo_labels_section
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
from tasks.report.panels import thumbnails
from tasks.report.params import ReportSettings, report_settings
from tasks.report.properties import SAMPLED, properties_section
from tasks.report.properties import _band_range as _prop_band_range
from tasks.report.reuse import STAGE as REPORT_STAGE
from tasks.report.reuse import ReportReuse
from tasks.store.artifacts import bytes_hash, file_hash, unshare
from tasks.store.grid import SiteGrid
from tasks.store.reuse import Reuse, code_key, content_key
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


def table_metrics(art: Artifacts, catalog: Catalog, s: ReportSettings, rr: ReportReuse | None = None) -> dict:
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
    reuse: Reuse | None = None,
) -> ReportStageResult:
    """Write ``metrics.json`` and ``report/`` into ``version_dir`` (a draft or a published version).

    ``reuse``: the previous version whose unchanged parts (band histograms, sampled properties, figures,
    thumbnails; see ``tasks.report.reuse``) are taken over; None computes everything (keys are still
    written). Either way ``metrics.json`` holds the same numbers.
    """
    version_dir = Path(version_dir)
    s = report_settings(catalog.settings.report)
    art = Artifacts(catalog, version_dir)
    scenes = scene_paths(catalog)
    notes: list[str] = []
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    report_uri, metrics_uri = _uri(catalog, "report", "report"), _uri(catalog, "metrics", "metrics.json")
    if provenance is None:
        provenance = load_metrics(version_dir, MANIFEST) or {}
    rr = ReportReuse(reuse, version_dir, report_uri, metrics_uri)
    rr.set_scene_hashes(provenance)
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
    m["imagery"]["band_histograms"] = _band_histograms(scenes, rr)
    t["metrics"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    m["properties"] = _properties(art, scenes, s, m["consensus"], rr)
    t["properties"] = time.perf_counter() - t1
    prev = previous_metrics(catalog, previous_version_dir, s, notes)
    prev_art = Artifacts(catalog, previous_version_dir) if previous_version_dir is not None else None
    m["changes"] = changes(m, prev, s.max_table_rows, prev_art)
    m["provenance"] = provenance
    m["missing_artifacts"] = sorted(set(art.missing))
    m["alerts"] = alerts(m, prev, s, art.missing)
    notes += [f"{k} unreadable: {v}" for k, v in art.unreadable.items()]

    out = version_dir / report_uri
    if out.exists():
        shutil.rmtree(out)
    (out / "figures").mkdir(parents=True)
    t2 = time.perf_counter()
    m["assets"] = {"figures": _figures(art, m, scenes, out / "figures", rr)}
    t["figures"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    m["assets"].update(thumbnails(art, m, scenes, s, catalog, out / "thumbs", rr))
    t["thumbnails"] = time.perf_counter() - t3
    t4 = time.perf_counter()
    sizes_ = write_site(m, out)
    metrics_path = version_dir / metrics_uri
    unshare(metrics_path).write_text(json.dumps(m, indent=1, sort_keys=False, default=str), encoding="utf-8")
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
    artifacts[f"reuse_keys/{REPORT_STAGE}"], reuse_counts_ = rr.write()
    counts = {
        "report_pages": len(sizes_),
        "report_files": len(files),
        "report_bytes": sum(p.stat().st_size for p in files),
        "report_alerts": len(m["alerts"]),
        **reuse_counts_,
    }
    return ReportStageResult(artifacts, t, counts, notes, str(out / "index.html"), m["headline"], m["alerts"])


def _figures(art: Artifacts, m: dict, scenes: dict, out: Path, rr: ReportReuse) -> dict[str, str]:
    """Every figure, keyed by the data it draws: one whose data is unchanged is linked from the previous
    report instead of being drawn again."""
    sites = art.table("sites")
    risk = {r["site_id"]: r["mean_risk"] for r in m["consensus"]["sites"] if r.get("role") != "gold"}
    foot = scene_footprints(scenes)
    geo = sites[[c for c in ("site_id", "role", "geometry") if c in sites]]
    q, measures = m["quality"], {k: dict(MEASURES)[k] for k in COMPONENTS}
    lb, cons, props = m["labels"], m["consensus"], m["properties"]
    conf = m["pseudo_labels"].get("confidence_hist")
    crs = str(getattr(sites, "crs", None) and sites.crs.to_string())  # the CRS's name, however spelled
    # (draw, the data it reads: its key) -- only what the function reads, so unrelated changes of the
    # same metrics section do not redraw it
    specs = {
        "map_coverage": (
            lambda: plots.coverage_map(foot, sites, out),
            [[(sid, g.wkb) for sid, g in foot], geo, crs],
        ),
        "map_risk": (
            lambda: plots.risk_map(sites, risk, out),
            [geo, crs, plots.risk_map_colours(sites, risk)],
        ),
        "bands": (
            lambda: plots.band_histograms(m["imagery"]["band_histograms"], out),
            m["imagery"]["band_histograms"],
        ),
        "tile_quality": (
            lambda: plots.tile_quality(m["imagery"], out),
            [m["imagery"]["scenes"], m["imagery"]["tiles"]],
        ),
        "label_counts": (lambda: plots.label_counts(lb, out), [lb["by_labeller"], lb["by_role"]]),
        "polygon_area": (lambda: plots.area_hist(lb, out), lb["area_m2_hist"]),
        "leaderboard": (lambda: plots.leaderboard(q, out), q["leaderboard"][: plots.MAX_BOARD]),
        "components": (
            lambda: plots.components(q, measures, out),
            [
                measures,
                [
                    [r["labeller_id"]] + [r.get(f"{k}_{x}") for k in measures for x in ("mean", "lo", "hi")]
                    for r in q["leaderboard"][: plots.MAX_COMPONENTS]
                ],
            ],
        ),
        "drift": (
            lambda: plots.drift(q, out),
            [
                q["drift"],
                q.get("trust_threshold"),
                [(r["labeller_id"], r.get("drift_slope_per_day")) for r in q["leaderboard"]],
            ],
        ),
        "confusion": (lambda: plots.confusion(q, out), q["item_confusion"]),
        "risk_distribution": (
            lambda: plots.risk_distribution(cons, out),
            [
                cons["n_scored_sites"],
                cons["reference"],
                cons["mean_risk_hist"],
                cons["mean_risk_quartiles"],
                cons["risky_fraction_quartiles"],
            ],
        ),
        "pseudo_confidence": (
            lambda: plots.histogram(conf, "confidence", out, "pseudo_confidence.svg"),
            conf,
        ),
        "balance": (
            lambda: plots.balance(props, out),
            [props["spatial_balance"]["scenes"], props["class_balance"].get("item_classes", {})],
        ),
    }
    code = code_key("tasks.report.plots")
    prev = ((rr.prev_metrics or {}).get("assets") or {}).get("figures") or {}
    made: dict[str, str | None] = {}
    for name, (draw, data) in specs.items():
        unit = f"figure/{name}"
        if rr.hit(unit, content_key(unit, data, code, matplotlib.__version__)):
            src = prev.get(name)
            if src is None or rr.link([src], out.parent):  # None: nothing to show then, nor now
                made[name] = None if src is None else Path(src).name
                rr.took(unit)
                continue
        made[name] = draw()
    return {k: f"figures/{v}" for k, v in made.items() if v}


def _band_histograms(scenes: dict[str, str], rr: ReportReuse) -> list[dict]:
    """Band histograms of the scenes, keyed by the scene files' content hashes."""
    parts = rr.scenes_key(scenes)
    key = None if parts is None else content_key("band_histograms", parts, code_key("tasks.report.imagery"))
    prev = ((rr.prev_metrics or {}).get("imagery") or {}).get("band_histograms")
    if rr.hit("band_histograms", key) and prev is not None:
        rr.took("band_histograms")
        return prev
    return band_histograms(scenes)


def _properties(art: Artifacts, scenes: dict, s: ReportSettings, consensus: dict, rr: ReportReuse) -> dict:
    """The properties section; its patch sample is reused when it would read the same pixels: same sites
    (grids, order), band ranges, scene files and settings, and the same consensus rasters of the sites
    the previous sample visited (with those inputs unchanged, this sample visits the same sites)."""
    sites, tiles = art.table("sites"), art.attributes("tiles")
    scene_part = rr.scenes_key(scenes)
    x_key = None
    if scene_part is not None:
        n = len(tiles["band_names"].iloc[0]) if len(tiles) else 0
        grids = (SiteGrid.from_row(r) for r in sites.to_dict("records"))
        x_key = content_key(
            "properties/x",
            [  # the sites in table order (the sample's order is a permutation of it), their grids
                (g.site_id, str(sc), g.crs, list(g.transform), g.width, g.height)
                for g, sc in zip(grids, sites["scene_id"], strict=True)
            ],
            [np.asarray(v) for v in _prop_band_range(tiles, n)] if n else None,
            scene_part,
            s.model_dump(include={"seed", "property_patches", "patch_px", "patch_feature_px", "mle_k"}),
            code_key("tasks.report.properties", "tasks.report.imagery", "tasks.report.thumbs"),
        )

    def key(visited: list[str]) -> str:
        rasters = [(v, rr.upstream("consensus", v, art.raster_path("consensus_rasters", v))) for v in visited]
        return content_key("properties", x_key, rasters)

    prev = (rr.prev_metrics or {}).get("properties") or {}
    known = isinstance(prev.get("sample_sites"), list) and all(k in prev for k in SAMPLED)
    if x_key is not None and known and rr.hit("properties", key(prev["sample_sites"])):
        rr.took("properties")
        return properties_section(art, scenes, s, consensus, {k: prev[k] for k in SAMPLED})
    out = properties_section(art, scenes, s, consensus)
    if x_key is not None:
        rr.hit("properties", key(out["sample_sites"]))
    return out


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
