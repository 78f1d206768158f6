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
