"""The report stage: metrics.json as the single source of the pages, escaping, diffs, limits, serve."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import dask
import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import yaml

from schemas.catalog import load_catalog
from tasks.report import build_reports_index, run_report_stage
from tasks.report.alerts import alerts
from tasks.report.pages import PAGES, fmt
from tasks.report.params import ReportSettings
from tasks.report.properties import label_sharpness, mle_dimension, twonn
from tasks.report.run import write_site
from tasks.report.tasks import report_markdown

REPO = Path(__file__).resolve().parents[1]
EVIL = "<script>alert(1)</script>"
AMP = "sloppy & <b>edges</b>"


def _rename(folder: Path, old: str, new: str | None) -> None:
    """Rename (or drop, new=None) a labeller in the demo inputs."""
    inp = folder / "inputs"
    labels = gpd.read_parquet(inp / "labels.parquet")
    for name in ("assignments.csv", "item_labels.csv"):
        df = pd.read_csv(inp / name, dtype=str, keep_default_na=False)
        df = df[df["labeller_id"] != old] if new is None else df.replace({"labeller_id": {old: new}})
        df.to_csv(inp / name, index=False)
    labels = (
        labels[labels["labeller_id"] != old] if new is None else labels.replace({"labeller_id": {old: new}})
    )
    labels.to_parquet(inp / "labels.parquet")


def build_report_versions(tmp: Path, demo_root: Path, second: bool = True) -> dict:
    """Ingest + consensus + report on the tiny demo region with a labeller called ``<script>…``.

    The second version drops ``drifter`` and renames ``sloppy_edges``, so the diff has labellers added and
    gone and sites whose labels changed.
    """
    from tasks.consensus.run import run_consensus_stage
    from tasks.ingest.stage import run_ingest

    root = tmp / "region"
    shutil.copytree(demo_root / "inputs", root / "inputs")
    raw = yaml.safe_load((REPO / "data_catalog.yaml").read_text(encoding="utf-8"))
    raw["root"] = "."
    (root / "data_catalog.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    _rename(root, "spammer", EVIL)
    cat = load_catalog(root / "data_catalog.yaml")
    out = {"root": root, "catalog": cat, "versions": []}
    prev = None
    for k in range(2 if second else 1):
        if k == 1:
            _rename(root, "drifter", None)
            _rename(root, "sloppy_edges", AMP)
        vdir = root / "versions" / f"2026010{k + 1}T000000000Z-test0{k}"
        # synchronous: consensus batches share per-site caches across threads (a race outside the report)
        with dask.config.set(scheduler="synchronous"):
            ing = run_ingest(cat, vdir)
            con = run_consensus_stage(cat, vdir)
        prov = {
            "inputs": ing.inputs,
            "catalog": {"path": str(cat.path), "hash": "abc"},
            "code_version": {"package": "0.1.0", "git_sha": "deadbeef", "git_dirty": False},
            "parameters": cat.settings.model_dump(mode="json"),
            "stage_timings": {"ingest": ing.timings, "consensus": con.timings},
        }
        (vdir / "manifest.json").write_text(json.dumps({"created_at": f"2026-01-0{k + 1}T00:00:00Z"}))
        res = run_report_stage(cat, vdir, prev, provenance=prov)
        out["versions"].append({"dir": vdir, "result": res})
        prev = vdir
    build_reports_index(root)
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory, demo_root):
    return build_report_versions(tmp_path_factory.mktemp("report"), demo_root)


def _metrics(v) -> dict:
    return json.loads((v["dir"] / "metrics.json").read_text(encoding="utf-8"))


def _pages(v) -> dict[str, str]:
    return {name: (v["dir"] / "report" / name).read_text(encoding="utf-8") for name, _ in PAGES}


def test_every_module_page_is_written_and_linked(built):
    v = built["versions"][0]
    pages = _pages(v)
    assert len(pages) == 11
    for name, title in PAGES:
        html = pages[name]
        assert f"<h1>{title}</h1>" in html
        assert all(f'href="{other}"' in html for other, _ in PAGES)  # navigation on every page
    assert v["result"].report.endswith("report/index.html")
    assert set(v["result"].artifacts) == {"report", "metrics", "reuse_keys/report"}


def test_pages_are_a_function_of_metrics_json(built, tmp_path):
    """Re-rendering from metrics.json on disk gives byte-identical pages: every number comes from it."""
    v = built["versions"][1]
    m = _metrics(v)
    write_site(m, tmp_path)
    for name, text in _pages(v).items():
        assert (tmp_path / name).read_text(encoding="utf-8") == text, name


def test_headline_numbers_on_the_overview(built):
    v = built["versions"][0]
    m, html = _metrics(v), _pages(v)["index.html"]
    h = m["headline"]
    for key, kind in (
        ("sites", "int"),
        ("polygons", "int"),
        ("pooled_gold_iou", "f3"),
        ("nodata_share", "pct"),
    ):
        assert f'<div class="v">{fmt(h[key], kind)}</div>' in html, key
    assert h["sites"] == 18 and h["labellers"] == 7
    q = m["quality"]
    assert 0 < q["pooled_gold_iou"] <= 1 and len(q["leaderboard"]) == 7
    assert m["consensus"]["reference"]["mean_risk_quartiles"] == [0.073, 0.138, 0.209]
    assert m["properties"]["intrinsic_dimension"]["mle"] > 1
    assert m["properties"]["label_sharpness"]["k_f"] > 0


def test_user_strings_are_escaped(built):
    for v in built["versions"]:
        for name, html in _pages(v).items():
            assert "<script" not in html.lower(), name
            assert "<b>" not in html, name
        svgs = list((v["dir"] / "report").rglob("*.svg"))
        assert svgs and not any("<script" in p.read_text(encoding="utf-8") for p in svgs)
    first, second = (_pages(v) for v in built["versions"])
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in first["quality.html"]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in first["labels.html"]
    assert "sloppy &amp; &lt;b&gt;edges&lt;/b&gt;" in second["changes.html"]


def test_changes_since_previous_version(built):
    v1, v2 = built["versions"]
    m1, m2 = _metrics(v1), _metrics(v2)
    assert m1["changes"] == {"previous_version_id": None}
    ch = m2["changes"]
    assert ch["previous_version_id"] == v1["dir"].name
    assert ch["labellers_gone"] == ["drifter", "sloppy_edges"] and ch["labellers_added"] == [AMP]
    assert ch["n_sites_changed"] > 0
    rows = {r["key"]: r for r in ch["headline"]}
    assert rows["polygons"]["delta"] == m2["headline"]["polygons"] - m1["headline"]["polygons"] < 0
    html = _pages(v2)["changes.html"]
    assert v1["dir"].name in html and "drifter" in html


def test_missing_learn_artifacts_are_named(built):
    m = _metrics(built["versions"][0])
    pages = _pages(built["versions"][0])
    assert not m["label_issues"]["available"] and not m["pseudo_labels"]["available"]
    assert "label_issues" in pages["issues.html"] and "Not available" in pages["issues.html"]
    assert "pseudo_labels" in pages["pseudo.html"] and "Not available" in pages["pseudo.html"]
    assert any(a["key"] == "missing" for a in m["alerts"])


def test_provenance_and_intended_use(built):
    pages = _pages(built["versions"][0])
    assert "deadbeef" in pages["provenance.html"] and "input_labels" in pages["provenance.html"]
    cat = built["catalog"]
    assert cat.intended_use.split()[0] in pages["use.html"] and "Synthetic imagery" in pages["use.html"]


def test_assets_local_and_sizes_within_limits(built):
    for v in built["versions"]:
        site = v["dir"] / "report"
        total = sum(p.stat().st_size for p in site.rglob("*") if p.is_file())
        assert total < 10_000_000
        for page in site.glob("*.html"):
            text = page.read_text(encoding="utf-8")
            assert page.stat().st_size < 2_000_000
            assert not re.search(r"(src|href)=\"(https?:)?//", text), page.name  # nothing from the network
            for ref in re.findall(r"(?:src|href)=\"([^\"#:]+)\"", text):
                assert (page.parent / ref).resolve().exists(), (page.name, ref)
        css = (site / "assets" / "style.css").read_text(encoding="utf-8")
        assert "url(" not in css and "@import" not in css
        assert len(list((site / "thumbs").glob("*.png"))) > 10


def test_reports_index_lists_versions(built):
    idx = built["root"] / "reports" / "index.html"
    html = idx.read_text(encoding="utf-8")
    for v in built["versions"]:
        assert f'href="../versions/{v["dir"].name}/report/index.html"' in html
    assert (idx.parent / "trend.svg").exists() and (idx.parent / "assets" / "style.css").exists()


def test_alerts_from_catalog_thresholds():
    lb = {
        "labeller_id": EVIL,
        "trusted": False,
        "n_gold": 3,
        "rolling_score": 0.3,
        "drift_p_value": 0.01,
        "drift_slope_per_day": -0.01,
    }
    m = {
        "headline": {
            "risky_site_share": 0.4,
            "nodata_share": 0.3,
            "cloud_share": 0.0,
            "pooled_gold_iou": 0.7,
        },
        "imagery": {"scenes": [{"scene_id": "s1", "mean_nodata_fraction": 0.5}]},
        "quality": {"leaderboard": [lb]},
    }
    prev = {
        "headline": {"risky_site_share": 0.1, "pooled_gold_iou": 0.8},
        "quality": {"leaderboard": [{**lb, "trusted": True}]},
    }
    keys = [a["key"] for a in alerts(m, prev, ReportSettings(), ["label_issues"])]
    assert {
        "risky_site_share",
        "risky_share_up",
        "nodata_share",
        "scene_nodata",
        "iou_drop",
        "lost_trust",
        "drift",
        "missing",
    } <= set(keys)
    quiet = ReportSettings(
        max_risky_site_share=0.5, max_nodata_share=0.9, max_risky_share_increase=0.5, max_iou_drop=0.5
    )
    keys = [a["key"] for a in alerts(m, None, quiet, [])]
    assert "nodata_share" not in keys and "risky_site_share" not in keys


def test_intrinsic_dimension_and_sharpness_estimators():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1500, 5)) @ rng.normal(size=(5, 40))  # a 5-d subspace of R^40
    assert 4.0 < mle_dimension(x, 20) < 6.0
    assert 4.0 < twonn(x) < 6.5
    pts = np.array([[0.0, 0.0], [0.0, 0.5], [3.0, 0.0]])
    assert label_sharpness(pts, np.array([0, 1, 1])) == pytest.approx(2.0)  # 1 / 0.5
    assert label_sharpness(pts, np.array([1, 1, 1])) is None


def test_prefect_markdown_summary(built):
    res = built["versions"][1]["result"]
    md = report_markdown({"report": res.report, "headline": res.headline, "alerts": res.alerts})
    assert "Pooled gold IoU" in md and "/report/index.html" in md and "<script" not in md


def test_learn_artifacts_render_when_present(built, tmp_path):
    """Label issues and pseudo-labels in the published schemas show up as tables and thumbnails."""
    import rasterio
    import shapely

    from tasks.store.artifacts import read_table, write_table

    v = built["versions"][0]
    vdir = tmp_path / v["dir"].name
    shutil.copytree(v["dir"], vdir, ignore=shutil.ignore_patterns("report", "metrics.json"))
    cat = built["catalog"]
    sites = read_table(vdir / "sites.parquet")
    labelled = sites[sites["role"] != "unlabelled"].iloc[0]
    free = sites[sites["role"] == "unlabelled"].iloc[0]

    def square(row, k):
        a, _, c, _, e, f = row["transform"]
        return shapely.box(c + 40 * k + 8, f - 120, c + 40 * k + 100, f - 8)

    issues = pd.DataFrame(
        {
            "issue_id": [f"{labelled.site_id}/{EVIL}/{k}" for k in range(2)],
            "site_id": labelled.site_id,
            "labeller_id": EVIL,
            "kind": ["spurious_field", "missed_field"],
            "rank": [1, 2],
            "score": [9.0, 4.0],
            "area_m2": [500.0, 200.0],
            "n_pixels": [30, 12],
            "mean_p_field": [0.1, 0.9],
            "consensus_agreement": [1.0, np.nan],
            "labeller_polygon_id": [None, None],
            "evidence": "{}",
            "geometry": [square(labelled, k) for k in range(2)],
            "crs": labelled.crs,
        }
    )
    write_table("label_issues", issues, vdir / "label_issues")
    pseudo = pd.DataFrame(
        {
            "polygon_id": [f"{free.site_id}-p{k}" for k in range(3)],
            "site_id": free.site_id,
            "class": "field",
            "confidence": [0.95, 0.7, 0.4],
            "source": "unlabelled",
            "kept": [True, True, False],
            "geometry": [square(free, k) for k in range(3)],
            "crs": free.crs,
        }
    )
    write_table("pseudo_labels", pseudo, vdir / "pseudo_labels")
    th = pd.DataFrame(
        {
            "class": ["field"],
            "threshold": [0.6],
            "precision": [0.91],
            "precision_lower": [0.9],
            "recall": [0.77],
            "n_polygons": [40],
            "basis": ["gold"],
            "consensus_precision": [0.8],
            "consensus_recall": [0.7],
            "target_precision": [0.9],
            "n_candidates": [60],
            "n_target_polygons": [50],
            "n_sites": [6],
        }
    )
    write_table("pseudo_label_thresholds", th, vdir / "pseudo_label_thresholds.parquet")
    (vdir / "pseudo_probabilities").mkdir()
    w, h = int(free["width"]), int(free["height"])
    prof = {
        "driver": "GTiff",
        "width": w,
        "height": h,
        "count": 3,
        "dtype": "float32",
        "crs": free["crs"],
        "transform": rasterio.Affine(*free["transform"][:6]),
    }
    with rasterio.open(vdir / "pseudo_probabilities" / f"{free.site_id}.tif", "w", **prof) as dst:
        bg = np.linspace(0, 1, w * h, dtype=np.float32).reshape(h, w)
        dst.write(np.stack([bg, (1 - bg) / 2, (1 - bg) / 2]))
    res = run_report_stage(cat, vdir)
    m = json.loads((vdir / "metrics.json").read_text(encoding="utf-8"))
    li, pl = m["label_issues"], m["pseudo_labels"]
    assert li["available"] and li["n_issues"] == 2 and li["top"][0]["kind"] == "spurious_field"
    assert li["missing"] == ["assignment_issues"]
    assert pl["available"] and pl["coverage"] == pytest.approx(1 / m["sizes"]["sites_by_role"]["unlabelled"])
    assert pl["thresholds"][0]["precision"] == 0.91 and m["headline"]["label_issues"] == 2
    pages = {n: (vdir / "report" / n).read_text(encoding="utf-8") for n in ("issues.html", "pseudo.html")}
    assert "spurious_field" in pages["issues.html"] and "issue region" in pages["issues.html"]
    assert "&lt;script&gt;" in pages["issues.html"] and "<script" not in pages["issues.html"]
    assert "0.910" in pages["pseudo.html"] and "p(field)" in pages["pseudo.html"]
    assert m["assets"]["issues"] and m["assets"]["pseudo"][0]["probability"]
    assert res.counts["report_pages"] == 11


def test_trend_chart_stays_small_over_a_year_of_versions(tmp_path):
    """Every refresh redraws the index's trend chart: one tick label per version made it grow to 1.2 MB
    (5.6 s to draw) at 300 versions."""
    import re

    from tasks.report import plots
    from tasks.report.index import TREND

    keys = [(k, k) for k in TREND]
    rows = [{"version_id": str(i), "headline": {k: (i % 7) / 7 for k in TREND}} for i in range(300)]
    svg = (tmp_path / plots.trend(rows, keys, tmp_path)).read_text(encoding="utf-8")
    ticks = re.findall(r"<text[^>]*>(\d+)</text>", svg)
    assert len(svg) < 250_000 and 0 < len(ticks) <= len(TREND) * 10
    assert max(map(int, ticks)) <= 300


def _scene(path: Path, values: np.ndarray, nodata: float | None = None) -> str:
    import rasterio
    from rasterio.transform import from_origin

    bands, h, w = values.shape
    profile = {"driver": "GTiff", "width": w, "height": h, "count": bands, "dtype": "float32"}
    profile.update(crs="EPSG:32630", transform=from_origin(500000, 4000000, 10, 10), nodata=nodata)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(values.astype(np.float32))
    return str(path)


def test_band_histograms_read_a_fixed_pixel_budget_over_any_number_of_scenes(tmp_path):
    """The report's memory stays flat in the number of scenes: all reads together hold <= budget pixels."""
    from tasks.report.imagery import band_histograms, histogram_side

    rng = np.random.default_rng(3)
    paths = {}
    for i in range(12):
        values = rng.normal(100 + i, 5, size=(2, 120, 120))
        values[:, :10, :] = -9999  # nodata rows are not counted
        paths[f"s{i}"] = _scene(tmp_path / f"s{i}.tif", values, nodata=-9999)
    full = band_histograms(paths)  # the default budget holds every pixel: nothing is upsampled
    assert [h["pixels"] for h in full] == [12 * 110 * 120] * 2
    budget = 12 * 60 * 60
    assert histogram_side(12, budget) == 60
    small = band_histograms(paths, budget=budget)
    assert all(0 < h["pixels"] <= budget for h in small)
    assert all(h["pixels"] == 12 * 55 * 60 for h in small)  # every scene read at 60 px, nodata dropped
    for a, b in zip(full, small, strict=True):  # a decimated read keeps the distribution
        centres = [np.repeat(h["edges"][:-1], h["counts"]) for h in (a, b)]
        assert a["band"] == b["band"] and abs(np.median(centres[0]) - np.median(centres[1])) < 1.0
    assert histogram_side(8) == 512 and histogram_side(200) < 128 and histogram_side(10**6) == 16
