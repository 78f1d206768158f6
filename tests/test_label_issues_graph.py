"""label_issues batches that read their own polygons (what a full run of a large region sends to Dask)
give exactly the results of batches that carry them."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import dask
import pandas as pd
import pytest
import yaml

import tasks.learn.issue_sites as sites_mod
import tasks.learn.label_issues as li
from schemas.catalog import load_catalog
from tasks.consensus.run import run_consensus_stage
from tasks.ingest.stage import run_ingest
from tasks.store.artifacts import read_table

REPO = Path(__file__).resolve().parents[1]
OUTPUTS = ("label_issues", "assignment_issues.parquet", "label_issue_stats")


@pytest.fixture(scope="module")
def base(demo_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("li_graph")
    shutil.copytree(demo_root / "inputs", root / "inputs")
    raw = yaml.safe_load((REPO / "data_catalog.yaml").read_text(encoding="utf-8"))
    raw["root"] = "."
    raw["settings"].setdefault("learn", {})["label_issues"] = {"batch_size": 4}  # several batches
    (root / "data_catalog.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    catalog = load_catalog(root / "data_catalog.yaml")
    vdir = root / "versions" / "base"
    with dask.config.set(scheduler="synchronous"):
        run_ingest(catalog, vdir)
        run_consensus_stage(catalog, vdir)
    return catalog, vdir


def _frames(vdir: Path) -> dict[str, pd.DataFrame]:
    out = {}
    for t in OUTPUTS:
        df = pd.DataFrame(read_table(vdir / t))
        if "geometry" in df:
            df["geometry"] = [g.wkb for g in df["geometry"]]
        out[t] = df
    return out


def test_batches_reading_their_polygons_equal_batches_carrying_them(base, monkeypatch):
    catalog, vdir = base
    carried, read = vdir.parent / "carried", vdir.parent / "read"
    shutil.copytree(vdir, carried)
    shutil.copytree(vdir, read)
    li.run_label_issues_stage(catalog, carried)
    monkeypatch.setattr(sites_mod, "GRAPH_POLYGONS", 0)  # every pass sends ids and paths only
    li.run_label_issues_stage(catalog, read)
    a, b = _frames(carried), _frames(read)
    assert len(a["label_issues"]) > 50
    for t in OUTPUTS:
        pd.testing.assert_frame_equal(a[t], b[t], check_exact=True, obj=t)


def test_stripped_work_is_small_and_reads_back_the_same_polygons(base):
    _, vdir = base
    work = sites_mod.build_work(
        read_table(vdir / "sites.parquet"),
        read_table(vdir / "labels"),
        read_table(vdir / "assignments.parquet"),
        ["expert"],
    )
    thin = sites_mod.without_geometries(work, vdir / "labels")
    assert all(ids is None and g is None for w in thin for ids, g in w.labellers.values())
    assert [sorted(t.labellers) for t in thin] == [sorted(w.labellers) for w in work]
    assert len(pickle.dumps(thin)) < len(pickle.dumps(work)) / 4
    back = sites_mod.with_geometries(thin)
    for w, b in zip(work, back, strict=True):
        for lid, (ids, geoms) in w.labellers.items():
            assert b.labellers[lid][0] == ids
            assert [g.wkb for g in b.labellers[lid][1]] == [g.wkb for g in geoms]
    with pytest.raises(ValueError, match="no labels_path"):
        sites_mod.with_geometries([sites_mod.replace(t, labels_path=None) for t in thin[:1]])


def test_pass_one_stages_each_sites_histogram_instead_of_returning_it(base, monkeypatch):
    """What pass 1's Dask tasks hand back is the batch's sum and where its sites' histograms were staged
    (at 100x the demo the histograms themselves came to 1.6 GB held by workers and the stage task); the
    folder written from the staged pieces holds each site's own histogram, whatever the batches and parts,
    and no staging is left behind."""
    catalog, vdir = base
    returned: list[tuple] = []
    real = li.site_stats_batch

    def spy(batch, params, staging=None, index=0):
        out = real(batch, params, staging, index)
        returned.append((len(batch), len(pickle.dumps(out)), out[1]))
        return out

    monkeypatch.setattr(li, "site_stats_batch", spy)
    runs = {}
    for name, batch_size, part_sites in (("a", 4, 2), ("b", 3, 5)):
        run = vdir.parent / f"stats_{name}"
        shutil.copytree(vdir, run)
        settings = {"batch_size": batch_size, "stats_part_sites": part_sites}
        raw = yaml.safe_load((REPO / "data_catalog.yaml").read_text(encoding="utf-8"))
        raw["root"] = str(vdir.parent.parent)
        raw["settings"].setdefault("learn", {})["label_issues"] = settings
        (run / "catalog.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
        li.run_label_issues_stage(load_catalog(run / "catalog.yaml"), run)
        runs[name] = run
        assert not [p.name for p in run.iterdir() if p.name.endswith(".staging")]
    dense = len(pickle.dumps(li.PixelStats.zeros(li.IssueParams().n_bins)))
    assert len(returned) >= 4
    for n_sites, size, where in returned:
        assert all(isinstance(v, str) for v in where.values())  # a piece's path, not a histogram
        assert size < dense + 400 * n_sites
    a, b = (read_table(runs[k] / "label_issue_stats") for k in "ab")
    assert len(list((runs["a"] / "label_issue_stats").glob("part-*"))) > 2
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    # each stored row is the site's own histogram, computed here directly
    work = {w.site_id: w for w in _scored_work(catalog, runs["a"])}
    stored = a[~a["unit_id"].isin(["*", "+"])].set_index("unit_id")
    assert sorted(stored.index) == sorted(work) and len(work) > 4
    params = li.params_from_catalog(catalog)
    for site, w in work.items():
        direct = li.site_stats(w, params)
        assert (bytes(stored.at[site, "cells"]), bytes(stored.at[site, "counts"])) == direct.encode(), site


def _scored_work(catalog, vdir: Path) -> list:
    """The stage's scored work (sites with probabilities: here the consensus stand-in)."""
    work = sites_mod.build_work(
        read_table(vdir / "sites.parquet"),
        read_table(vdir / "labels"),
        read_table(vdir / "assignments.parquet"),
        catalog.settings.reference_labellers,
    )
    folder, source = li._prob_folder(catalog, vdir, li.params_from_catalog(catalog).probability_source)
    for w in work:
        cpath = vdir / "consensus_rasters" / f"{w.site_id}.tif"
        w.consensus_path = str(cpath) if cpath.is_file() else None
        if (folder / f"{w.site_id}.tif").is_file():
            w.prob_path, w.prob_kind = str(folder / f"{w.site_id}.tif"), source
    return [w for w in work if w.has_probabilities]
