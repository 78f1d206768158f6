"""label_issues reprocessing: unchanged sites' histograms and issue rows are taken over from the previous
version, changed ones recomputed, and the published tables equal those of a full recompute."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
import yaml

from schemas.catalog import load_catalog
from tasks.consensus.run import run_consensus_stage
from tasks.ingest.stage import run_ingest
from tasks.learn.issue_reuse import choose_fit
from tasks.learn.label_issues import run_label_issues_stage
from tasks.learn.pixel_issues import IssueParams, PixelStats, fit_pixel_cl, fit_summary, quantise
from tasks.store.artifacts import read_table, write_table
from tasks.store.grid import SiteGrid
from tasks.store.reuse import Reuse, read_keys, site_label_keys

REPO = Path(__file__).resolve().parents[1]
OUTPUTS = ("label_issues", "assignment_issues.parquet", "label_issue_stats")
MINE = ("label_issues", "assignment_issues.parquet", "label_issue_stats", "reuse_keys/label_issues*")
EDITED = "S00007"  # four crowd labellers, not a gold site


def _catalog(folder, inputs, **settings):
    shutil.copytree(inputs, folder / "inputs")
    raw = yaml.safe_load((REPO / "data_catalog.yaml").read_text(encoding="utf-8"))
    raw["root"] = "."
    raw.setdefault("settings", {}).setdefault("learn", {})["label_issues"] = settings
    (folder / "data_catalog.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return load_catalog(folder / "data_catalog.yaml")


def _base(src, dst):
    """A copy of version ``src`` with its ingest and consensus artifacts only (what label_issues reads)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*MINE))
    return dst


def _tables(vdir) -> dict[str, pd.DataFrame]:
    return {t: read_table(vdir / t) for t in OUTPUTS}


def _assert_same(a, b, tables=OUTPUTS):
    for t in tables:
        x, y = a[t], b[t]
        assert len(x) == len(y), t
        if "geometry" in x:
            wkb = [g.wkb for g in x["geometry"]], [g.wkb for g in y["geometry"]]
            assert wkb[0] == wkb[1], t
            x, y = x.drop(columns="geometry"), y.drop(columns="geometry")
        pd.testing.assert_frame_equal(x, y, obj=t, check_exact=True)


def _computed_here(vdir) -> set[str]:
    return {u for u, (_, v) in read_keys(vdir, "label_issues").items() if v == vdir.name}


@pytest.fixture(scope="module")
def v1(demo_root, tmp_path_factory):
    """The demo region ingested, with consensus and label issues (the consensus stand-in)."""
    root = tmp_path_factory.mktemp("li_incremental")
    catalog = _catalog(root, demo_root / "inputs", stats_part_sites=4)
    vdir = root / "versions" / "v1"
    run_ingest(catalog, vdir)
    run_consensus_stage(catalog, vdir)
    res = run_label_issues_stage(catalog, vdir)
    assert res.counts["label_issues"] > 100 and res.counts["label_issues_recomputed"] >= 8
    assert EDITED in read_keys(vdir, "label_issues")
    return {"root": root, "catalog": catalog, "vdir": vdir}


@pytest.fixture(scope="module")
def edited(v1, demo_root):
    """v2's ingest and consensus after two of one labeller's polygons on EDITED were deleted (global
    consensus parameters carried, as a reprocess does)."""
    root = v1["root"] / "edited"
    root.mkdir()
    catalog = _catalog(root, demo_root / "inputs", stats_part_sites=4)
    labels = gpd.read_parquet(root / "inputs" / "labels.parquet")
    mine = labels.index[(labels["site_id"] == EDITED) & (labels["labeller_id"] == "shifted")]
    assert len(mine) >= 3
    labels.drop(mine[:2]).to_parquet(root / "inputs" / "labels.parquet")
    base = root / "base"
    plan = Reuse(str(v1["vdir"]), enabled=False, refit=False)
    run_ingest(catalog, base, reuse=plan)
    run_consensus_stage(catalog, base, reuse=plan)
    return {"root": root, "catalog": catalog, "base": base}


def test_unchanged_rerun_reuses_every_site_and_equals_a_full_recompute(v1):
    prev, catalog = v1["vdir"], v1["catalog"]
    runs = {}
    for name, enabled in (("inc", True), ("full", False)):
        vdir = _base(prev, v1["root"] / "versions" / f"a_{name}")
        res = run_label_issues_stage(catalog, vdir, Reuse(str(prev), enabled=enabled, refit=False))
        runs[name] = (res, vdir)
    (inc, vinc), (full, vfull) = runs["inc"], runs["full"]
    n = inc.counts["label_issues_units"]
    assert inc.counts["label_issues_reused"] == n and inc.counts["label_issues_recomputed"] == 0
    assert inc.counts["label_issues_stats_recomputed"] == 0 and _computed_here(vinc) == set()
    assert full.counts["label_issues_recomputed"] == n == full.counts["label_issues_units"]
    assert full.counts["label_issues_stats_recomputed"] > 0 and _computed_here(vfull) == set(
        read_keys(vfull, "label_issues")
    )
    assert inc.counts["label_issues_fit_carried"] == full.counts["label_issues_fit_carried"] == 1
    _assert_same(_tables(vinc), _tables(vfull))
    _assert_same(_tables(vinc), _tables(prev))  # same inputs, same results
    assert read_keys(vinc, "label_issues") != {} and {
        k for k, _ in read_keys(vinc, "label_issues").values()
    } == {k for k, _ in read_keys(prev, "label_issues").values()}


def _affected(prev, base) -> set[str]:
    """Sites whose label_issues inputs changed: consensus key or the site's labels."""
    c1, c2 = read_keys(prev, "consensus"), read_keys(base, "consensus")
    l1 = site_label_keys(read_table(prev / "labels"), read_table(prev / "assignments.parquet"))
    l2 = site_label_keys(read_table(base / "labels"), read_table(base / "assignments.parquet"))
    units = set(read_keys(prev, "label_issues"))
    return {
        s for s in units if c1.get(s) is None or c1[s][0] != c2.get(s, ("",))[0] or l1.get(s) != l2.get(s)
    }


def test_label_change_recomputes_only_affected_sites_and_equals_a_full_recompute(v1, edited):
    prev, catalog = v1["vdir"], edited["catalog"]
    affected = _affected(prev, edited["base"])
    assert EDITED in affected
    runs = {}
    for name, enabled in (("inc", True), ("full", False)):
        vdir = _base(edited["base"], edited["root"] / f"b_{name}")
        res = run_label_issues_stage(catalog, vdir, Reuse(str(prev), enabled=enabled, refit=False))
        runs[name] = (res, vdir)
    (inc, vinc), (full, vfull) = runs["inc"], runs["full"]
    assert inc.counts["label_issues_fit_carried"] == 1  # a small change: the previous fit stays in use
    assert _computed_here(vinc) == affected
    assert inc.counts["label_issues_recomputed"] == len(affected) < inc.counts["label_issues_units"]
    assert inc.counts["label_issues_stats_recomputed"] == len(affected)
    assert full.counts["label_issues_recomputed"] == full.counts["label_issues_units"]
    _assert_same(_tables(vinc), _tables(vfull))
    # unaffected sites' issue rows are carried with their geometry as written (WKB, never decoded): the
    # files are byte for byte the full recompute's (same process, so the same PROJ database)
    full_parts = sorted(p.name for p in (vfull / "label_issues").glob("*.parquet"))
    assert full_parts and full_parts == sorted(p.name for p in (vinc / "label_issues").glob("*.parquet"))
    for name in full_parts:
        assert (vinc / "label_issues" / name).read_bytes() == (vfull / "label_issues" / name).read_bytes()
    # label_issue_stats: a part of unaffected sites is the previous version's file, hard-linked; a part
    # holding an affected site is written anew
    parts = sorted((vinc / "label_issue_stats").glob("part-*.parquet"))
    assert len(parts) >= 2
    for part in parts:
        before = prev / "label_issue_stats" / part.name
        shared = before.exists() and os.path.samefile(part, before)
        assert shared == (not set(pd.read_parquet(part)["unit_id"]) & affected), part.name
    # the edited site's rows changed; an unaffected site's rows are the previous version's
    old, new = read_table(prev / "assignment_issues.parquet"), _tables(vinc)["assignment_issues.parquet"]
    pick = lambda df, s: df[df["site_id"] == s].drop(columns="rank").reset_index(drop=True)  # noqa: E731
    assert not pick(old, EDITED).equals(pick(new, EDITED))
    other = sorted(set(read_keys(prev, "label_issues")) - affected)[0]
    pd.testing.assert_frame_equal(pick(old, other), pick(new, other))


def test_refit_recomputes_issues_but_keeps_unchanged_histograms(v1, edited):
    prev, catalog = v1["vdir"], edited["catalog"]
    affected = _affected(prev, edited["base"])
    runs = {}
    for name, enabled in (("inc", True), ("full", False)):
        vdir = _base(edited["base"], edited["root"] / f"c_{name}")
        res = run_label_issues_stage(catalog, vdir, Reuse(str(prev), enabled=enabled, refit=True))
        runs[name] = (res, vdir)
    (inc, vinc), (_, vfull) = runs["inc"], runs["full"]
    assert inc.counts["label_issues_fit_carried"] == 0
    assert inc.counts["label_issues_stats_recomputed"] == len(affected)
    # the refit moved the fit, so every site's issues were recomputed (histograms only where changed)
    star = lambda v: _tables(v)["label_issue_stats"].set_index("unit_id").loc["*", "key"]  # noqa: E731
    assert star(vinc) != star(prev) and _computed_here(vinc) == set(read_keys(vinc, "label_issues"))
    _assert_same(_tables(vinc), _tables(vfull))
    # the pooled histogram in use is the refit one: the sum of the sites'
    stats = _tables(vinc)["label_issue_stats"].set_index("unit_id")
    hist = lambda r: PixelStats.decode(int(r["n_bins"]), r["cells"], r["counts"]).hist  # noqa: E731
    pooled = sum(hist(r) for u, r in stats.iterrows() if u not in ("*", "+"))
    assert np.array_equal(hist(stats.loc["*"]), pooled)
    assert np.array_equal(hist(stats.loc["+"]), pooled)


def test_a_site_label_change_alone_recomputes_that_site(v1):
    """The stage reads labels itself: a moved polygon recomputes its site even where no upstream key
    changed (here the consensus artifacts and keys are v1's)."""
    prev, catalog = v1["vdir"], v1["catalog"]
    vdir = _base(prev, v1["root"] / "versions" / "e_labels")
    labels = read_table(vdir / "labels")
    row = labels.index[(labels["site_id"] == EDITED) & (labels["labeller_id"] == "shifted")][0]
    labels.loc[row, "geometry"] = shapely.affinity.translate(labels.loc[row, "geometry"], 8.0, 0.0)
    shutil.rmtree(vdir / "labels")
    write_table("labels", labels, vdir / "labels")
    res = run_label_issues_stage(catalog, vdir, Reuse(str(prev), refit=False))
    assert res.counts["label_issues_fit_carried"] == 1
    assert _computed_here(vdir) == {EDITED} and res.counts["label_issues_stats_recomputed"] == 1
    full = _base(vdir, v1["root"] / "versions" / "e_labels_full")
    run_label_issues_stage(catalog, full, Reuse(str(prev), enabled=False, refit=False))
    _assert_same(_tables(vdir), _tables(full))
    # a labeller's gold record is in the evidence of every issue of theirs: their sites are recomputed
    vdir = _base(prev, v1["root"] / "versions" / "e_gold")
    lq = read_table(vdir / "labeller_quality.parquet")
    lq.loc[lq["labeller_id"] == "merger", "iou_mean"] = 0.123
    write_table("labeller_quality", lq, vdir / "labeller_quality.parquet")
    res = run_label_issues_stage(catalog, vdir, Reuse(str(prev), refit=False))
    ai = read_table(vdir / "assignment_issues.parquet")
    assert _computed_here(vdir) == set(ai.loc[ai["labeller_id"] == "merger", "site_id"])
    assert res.counts["label_issues_stats_recomputed"] == 0


def test_missing_upstream_keys_and_changed_parameters_recompute(v1, demo_root):
    prev, catalog = v1["vdir"], v1["catalog"]
    # without consensus keys the raster files are hashed: different keys from v1's, so all recomputed
    vdir = _base(prev, v1["root"] / "versions" / "d_nokeys")
    (vdir / "reuse_keys" / "consensus.parquet").unlink()
    res = run_label_issues_stage(catalog, vdir, Reuse(str(prev), refit=False))
    assert res.counts["label_issues_reused"] == 0 and res.counts["label_issues_stats_recomputed"] > 0
    _assert_same(_tables(vdir), _tables(prev), OUTPUTS[:2])  # the stats' keys differ, by design
    # ... and a version built that way is reused by the next one without keys (same files, same hashes)
    again = _base(vdir, v1["root"] / "versions" / "d_nokeys2")
    res = run_label_issues_stage(catalog, again, Reuse(str(vdir), refit=False))
    assert res.counts["label_issues_recomputed"] == 0
    # a parameter every site depends on
    other = v1["root"] / "params"
    other.mkdir()
    changed = _catalog(other, demo_root / "inputs", min_region_px=9)
    vdir = _base(prev, v1["root"] / "versions" / "d_params")
    res = run_label_issues_stage(changed, vdir, Reuse(str(prev), refit=False))
    assert res.counts["label_issues_reused"] == 0 and res.counts["label_issues_stats_recomputed"] > 0


def test_previous_rows_missing_or_not_streamable_are_recomputed(v1):
    """A site whose rows the previous version lacks is recomputed (after the others were computed); so are
    the sites of a previous label_issues part that cannot be streamed as written (here: rewritten by
    geopandas, without the recorded sort order and bbox covering). Either way the tables equal the
    previous version's (same inputs)."""
    prev, catalog = v1["vdir"], v1["catalog"]
    ai = read_table(prev / "assignment_issues.parquet")
    site = sorted(set(read_keys(prev, "label_issues")) - {EDITED})[1]
    lacking = v1["root"] / "versions" / "f_lacking"
    shutil.copytree(prev, lacking)
    one = ai.index[ai["site_id"] == site][:1]
    write_table("assignment_issues", ai.drop(one), lacking / "assignment_issues.parquet")
    rewritten = v1["root"] / "versions" / "f_rewritten"
    shutil.copytree(prev, rewritten)
    for part in sorted((rewritten / "label_issues").glob("*.parquet")):
        gdf = gpd.read_parquet(part)
        part.unlink()
        gdf.to_parquet(part, index=False, schema_version="1.1.0")
    with_rows = set(read_table(prev / "label_issues")["site_id"])
    assert site in with_rows and len(with_rows) < len(read_keys(prev, "label_issues"))
    for previous, recomputed in ((lacking, {site}), (rewritten, with_rows)):
        vdir = _base(prev, v1["root"] / "versions" / f"g_{previous.name}")
        res = run_label_issues_stage(catalog, vdir, Reuse(str(previous), refit=False))
        assert res.counts["label_issues_recomputed"] == len(recomputed) and _computed_here(vdir) == recomputed
        _assert_same(_tables(vdir), _tables(prev))


def test_fit_is_carried_only_within_carry_close():
    rng = np.random.default_rng(3)
    n_bins = 1024
    p = rng.beta(0.5, 0.5, 20000)
    given = (rng.random(20000) < np.clip(p + rng.normal(0, 0.2, 20000), 0, 1)).astype(np.int8)
    old = PixelStats.zeros(n_bins)
    old.add(quantise(p, n_bins), given)
    near = PixelStats(old.hist.copy())
    near.hist[1, 100:110] += 5  # 50 more field pixels where the model says background (of 20 000)
    far = PixelStats(old.hist.copy())
    far.hist[1, 100:110] += 100
    prev = ("0" * 32, n_bins, *old.encode())
    assert np.array_equal(PixelStats.decode(n_bins, *old.encode()).hist, old.hist)
    params = IssueParams(n_bins=n_bins)
    d_near = np.abs(fit_summary(fit_pixel_cl(near)) - fit_summary(fit_pixel_cl(old))).max()
    assert 0 < d_near <= params.carry_close
    stats, model, carried = choose_fit(near, prev, Reuse("x", refit=False), params)
    assert carried and stats is not near and np.array_equal(stats.hist, old.hist)
    assert np.array_equal(model.flag_lut, fit_pixel_cl(old).flag_lut)
    assert not choose_fit(near, prev, Reuse("x", refit=True), params)[2]  # refit: always the fresh fit
    assert not choose_fit(near, prev, Reuse("x", refit=False), IssueParams(n_bins=n_bins, carry_close=0))[2]
    stats, model, carried = choose_fit(far, prev, Reuse("x", refit=False), params)
    assert not carried and np.array_equal(model.flag_lut, fit_pixel_cl(far).flag_lut)
    assert not choose_fit(near, None, Reuse("x", refit=False), params)[2]  # no previous fit


def _write_oos(vdir, site_ids, seed=0, patch=None):
    """Model-like probabilities for ``site_ids``: the consensus softened plus noise, 3 bands like the
    model's; ``patch=(site, value)`` sets a 12x12 corner of that site to p(field) = value."""
    sites = read_table(vdir / "sites.parquet").set_index("site_id")
    out = vdir / "oos_probabilities"
    out.mkdir(exist_ok=True)
    for k, sid in enumerate(sorted(site_ids)):
        grid = SiteGrid.from_row(sites.loc[sid].to_dict() | {"site_id": sid})
        with rasterio.open(vdir / "consensus_rasters" / f"{sid}.tif") as src:
            cons = src.read(1).astype(float)
        noise = np.random.default_rng(seed + k).normal(0, 0.15, cons.shape)
        pf = np.clip(np.nan_to_num(cons, nan=0.0) * 0.9 + 0.05 + noise, 0.01, 0.99)
        if patch is not None and patch[0] == sid:
            pf[:12, :12] = patch[1]
        p = np.stack([1 - pf, 0.8 * pf, 0.2 * pf]).astype(np.float32)
        p[:, ~np.isfinite(cons)] = np.nan
        profile = dict(driver="GTiff", width=grid.width, height=grid.height, count=3, dtype="float32",
                       crs=grid.crs, transform=grid.affine, nodata=float("nan"))  # fmt: skip
        with rasterio.open(out / f"{sid}.tif", "w", **profile) as dst:
            dst.write(p)


def test_model_probabilities_are_keyed_per_site(v1):
    """With oos_probabilities (here without the train stage's keys: the files are hashed), a changed
    raster recomputes its site only, and the result equals a full recompute."""
    prev, catalog = v1["vdir"], v1["catalog"]
    units = sorted(read_keys(prev, "label_issues"))
    o1 = _base(prev, v1["root"] / "versions" / "o1")
    _write_oos(o1, units)
    res = run_label_issues_stage(catalog, o1)
    assert res.counts["label_issues"] > 0 and not any("stand-in" in n for n in res.notes)
    runs = {}
    for name, enabled in (("inc", True), ("full", False)):
        vdir = _base(o1, v1["root"] / "versions" / f"o2_{name}")
        _write_oos(vdir, units, patch=(EDITED, 0.97))
        res = run_label_issues_stage(catalog, vdir, Reuse(str(o1), enabled=enabled, refit=False))
        runs[name] = (res, vdir)
    (inc, vinc), (_, vfull) = runs["inc"], runs["full"]
    assert inc.counts["label_issues_fit_carried"] == 1
    assert inc.counts["label_issues_stats_recomputed"] == 1 and _computed_here(vinc) == {EDITED}
    _assert_same(_tables(vinc), _tables(vfull))
    ev = read_table(vinc / "label_issues")["evidence"]
    assert ev.str.contains('"probability_source": "oos"').all()


def test_sum_of_encoded_histograms_is_exact():
    import numpy as np

    from tasks.learn.issue_stats import sum_encoded
    from tasks.learn.pixel_issues import PixelStats

    rng = np.random.default_rng(3)
    hists = [PixelStats(rng.integers(0, 2**40, (2, 64)) * (rng.random((2, 64)) < 0.3)) for _ in range(9)]
    enc = [(*h.encode(), int(h.hist.sum())) for h in hists]
    expected = sum(h.hist for h in hists)
    np.testing.assert_array_equal(sum_encoded(64, enc).hist, expected)
    np.testing.assert_array_equal(sum_encoded(64, []).hist, np.zeros((2, 64), np.int64))
