"""Learn stages end to end on a tiny demo region, bad input, and GPU pinning on a real Dask cluster."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import yaml

from schemas.catalog import load_catalog
from schemas.tables import validate
from tasks.consensus.run import run_consensus_stage
from tasks.ingest.stage import run_ingest
from tasks.learn.model import CLASSES, load_checkpoint
from tasks.learn.run import run_pseudo_label_stage, run_train_stage
from tasks.store.artifacts import geo_parts, read_table

REPO = Path(__file__).resolve().parents[1]
TINY = {"steps": 30, "batch_size": 4, "base_width": 8, "crop_px": 64, "min_support": 5, "torch_threads": 1}


def write_catalog(root: Path, learn: dict, imagery: str | None = None) -> Path:
    raw = yaml.safe_load((REPO / "data_catalog.yaml").read_text(encoding="utf-8"))
    raw["root"] = "."
    raw["settings"]["learn"] = learn
    if imagery:
        raw["datasets"]["imagery"]["uri"] = imagery
    (root / "data_catalog.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return root / "data_catalog.yaml"


@pytest.fixture(scope="module")
def upstream(demo_root, tmp_path_factory) -> Path:
    """A copy of the tiny demo region with ingest + consensus artifacts in ``versions/v0``."""
    root = tmp_path_factory.mktemp("learn")
    shutil.copytree(demo_root / "inputs", root / "inputs")
    shutil.copytree(demo_root / "truth", root / "truth")
    catalog = load_catalog(write_catalog(root, TINY))
    vdir = root / "versions" / "v0"
    vdir.mkdir(parents=True)
    run_ingest(catalog, vdir)
    run_consensus_stage(catalog, vdir)
    return vdir


def fresh_version(upstream: Path, name: str) -> Path:
    vdir = upstream.parent / name
    shutil.copytree(upstream, vdir)
    return vdir


@pytest.fixture(scope="module")
def staged(upstream):
    vdir = fresh_version(upstream, "v1")
    catalog = load_catalog(upstream.parents[1] / "data_catalog.yaml")
    return catalog, vdir, run_train_stage(catalog, vdir), run_pseudo_label_stage(catalog, vdir)


def test_train_stage_writes_oos_for_every_labelled_site_and_a_model_card(staged):
    catalog, vdir, train, _ = staged
    sites = read_table(vdir / "sites.parquet").set_index("site_id")
    labelled = {p.stem for p in (vdir / "consensus_rasters").glob("*.tif")}
    labelled |= set(sites.index[sites["role"] == "gold"])
    oos = {p.stem: p for p in (vdir / "oos_probabilities").glob("*.tif")}
    assert set(oos) == labelled and train.counts["oos_sites"] == len(labelled)
    for site_id, path in oos.items():
        with rasterio.open(path) as src:
            prob = src.read()
            assert src.count == 3 and src.dtypes[0] == "float32" and src.descriptions == CLASSES
            assert (src.height, src.width) == (sites.loc[site_id, "height"], sites.loc[site_id, "width"])
            assert tuple(src.transform)[:6] == tuple(sites.loc[site_id, "transform"])
        ok = np.isfinite(prob).all(axis=0)
        assert (np.isnan(prob).all(axis=0) | ok).all()  # a pixel is predicted in every band or none
        np.testing.assert_allclose(prob[:, ok].sum(axis=0), 1.0, atol=1e-4)
    model, card = load_checkpoint(vdir / "model" / "model.pt")
    sidecar = json.loads((vdir / "model" / "model_card.json").read_text())
    assert set(sidecar) == set(card) and sidecar["data_hash"] == card["data_hash"]
    assert card["data_version"] == "v1" and card["classes"] == list(CLASSES)
    assert len(card["normalisation"]["mean"]) == 4 and card["bands"] == ["B", "G", "R", "NIR"]
    assert 0 <= card["metrics"]["out_of_sample_pixel"]["iou_field"] <= 1
    assert len(card["training"]["folds"]) == 3 and card["training"]["final"]["steps"] == TINY["steps"]
    assert set(train.artifacts) == {"oos_probabilities", "model", "reuse_keys/train"}
    assert train.placement["device"] == "cpu"


def test_pseudo_label_tables_validate_and_keep_by_threshold(staged):
    catalog, vdir, _, pseudo = staged
    sites = read_table(vdir / "sites.parquet").set_index("site_id")
    thr = read_table(vdir / "pseudo_label_thresholds.parquet")
    validate("pseudo_label_thresholds", thr)
    assert list(thr["class"]) == ["field"] and thr["n_sites"].iloc[0] > 0
    labels = read_table(vdir / "pseudo_labels")
    for part in geo_parts(labels).values():
        validate("pseudo_labels", part.reset_index(drop=True))
    assert len(labels) == pseudo.counts["pseudo_polygons"] > 0
    np.testing.assert_array_equal(labels["kept"], labels["confidence"] >= thr["threshold"].iloc[0])
    roles = sites.loc[labels["site_id"], "role"].to_numpy()
    assert set(roles[labels["source"] == "unlabelled"]) <= {"unlabelled"}
    assert set(roles[labels["source"] == "single_second_opinion"]) <= {"single"}
    predicted = {p.stem for p in (vdir / "pseudo_probabilities").glob("*.tif")}
    assert predicted == set(sites.index[sites["role"].isin(["unlabelled", "single"])])


def test_training_is_deterministic_for_a_seed(staged, upstream):
    catalog, vdir, _, _ = staged
    again = fresh_version(upstream, "v2")
    run_train_stage(catalog, again)
    for path in sorted((vdir / "oos_probabilities").glob("*.tif"))[:4]:
        with rasterio.open(path) as a, rasterio.open(again / "oos_probabilities" / path.name) as b:
            np.testing.assert_array_equal(a.read(), b.read())


def test_networks_fanned_out_on_dask_workers_equal_those_trained_in_process(staged, upstream):
    """The train stage as a task on a two-worker cluster: its folds and final model run as Dask tasks of
    their own on those workers (the same kind of worker as the stage: CPU=64 here), concurrently in one
    process (two one-thread workers), yet every raster and weight equals the in-process run's; the
    scratch tiles are gone afterwards."""
    from distributed import Client, LocalCluster

    catalog, vdir, _, _ = staged
    again = fresh_version(upstream, "v_dask")
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, resources={"CPU": 64}, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        result = client.submit(run_train_stage, catalog, again, resources={"CPU": 1}).result()
        workers = set(client.scheduler_info()["workers"])
    assert set(result.placement["networks"]) == {"fold0", "fold1", "fold2", "final"}
    assert set(result.placement["networks"].values()) <= workers
    assert not any(p.name.startswith(".train-tiles") for p in again.iterdir())
    for path in sorted((vdir / "oos_probabilities").glob("*.tif")):
        with rasterio.open(path) as a, rasterio.open(again / "oos_probabilities" / path.name) as b:
            np.testing.assert_array_equal(a.read(), b.read())
    for name in ("model.pt", "model_fold0.pt", "model_fold2.pt"):
        sa, sb = (load_checkpoint(v / "model" / name)[0].state_dict() for v in (vdir, again))
        assert all(np.array_equal(sa[k].numpy(), sb[k].numpy()) for k in sa), name
    card_a, card_b = (load_checkpoint(v / "model" / "model.pt")[1] for v in (vdir, again))
    assert card_a["data_hash"] == card_b["data_hash"] and card_a["metrics"] == card_b["metrics"]


def test_site_chunks_fan_out_on_dask_workers_and_equal_the_in_process_run(staged, upstream, monkeypatch):
    """Train and pseudo_labels as tasks on a two-worker cluster, 4 sites a chunk: writing the training
    tiles, the threshold evidence, the predictions and the vectorisation each run as several Dask tasks,
    across both workers, yet every raster, weight and table equals the in-process run's (one 64-site
    chunk each), so neither where nor how finely the sites are cut changes a result."""
    from distributed import Client, LocalCluster, get_task_stream

    import tasks.learn.pseudo_sites
    import tasks.learn.tiles
    from tasks.learn.tasks import cached_model

    for module in (tasks.learn.tiles, tasks.learn.pseudo_sites):
        monkeypatch.setattr(module, "CHUNK", 4)  # workers share this process (processes=False)
    catalog, vdir, _, pseudo = staged
    again = fresh_version(upstream, "v_chunks")
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, resources={"CPU": 64}, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
        get_task_stream(client) as stream,
    ):
        client.submit(run_train_stage, catalog, again, resources={"CPU": 1}).result()
        result = client.submit(
            run_pseudo_label_stage, catalog, again, cached_model, resources={"CPU": 1}
        ).result()
        workers = set(client.scheduler_info()["workers"])
    ran: dict[str, list[str]] = {}
    for rec in stream.data:
        for name in ("write_tile_chunk", "evidence_chunk", "predict_chunk", "vectorise_chunk"):
            if str(rec["key"]).startswith(f"{name}-"):
                ran.setdefault(name, []).append(rec["worker"])
    assert all(len(ran.get(n, [])) > 1 for n in ("write_tile_chunk", "evidence_chunk", "predict_chunk")), ran
    assert set(ran["write_tile_chunk"]) == workers and {w for v in ran.values() for w in v} == workers
    for folder in ("oos_probabilities", "pseudo_probabilities"):
        paths = sorted((vdir / folder).glob("*.tif"))
        assert paths and [p.name for p in paths] == sorted(p.name for p in (again / folder).glob("*.tif"))
        for path in paths:
            with rasterio.open(path) as a, rasterio.open(again / folder / path.name) as b:
                np.testing.assert_array_equal(a.read(), b.read())
    for name in ("model.pt", "model_fold1.pt"):
        sa, sb = (load_checkpoint(v / "model" / name)[0].state_dict() for v in (vdir, again))
        assert all(np.array_equal(sa[k].numpy(), sb[k].numpy()) for k in sa), name
    card_a, card_b = (load_checkpoint(v / "model" / "model.pt")[1] for v in (vdir, again))
    for k in ("data_hash", "sites", "metrics"):
        assert card_a[k] == card_b[k], k
    assert card_a["training"]["class_pixels"] == card_b["training"]["class_pixels"]
    for table in ("pseudo_labels", "pseudo_label_thresholds.parquet"):
        pd.testing.assert_frame_equal(read_table(vdir / table), read_table(again / table))
    assert result.counts == pseudo.counts and result.notes == pseudo.notes


def test_missing_imagery_nodata_sites_and_no_labels_give_defined_results(upstream):
    vdir = fresh_version(upstream, "v3")
    root = upstream.parents[1]
    sites = read_table(vdir / "sites.parquet")
    # blank one unlabelled site's window in a copy of its scene: all nodata
    blank = sites[(sites["role"] == "unlabelled") & (sites["scene_id"] == "scene_001")].iloc[0]
    scenes = root / "inputs_bad"
    scenes.mkdir(exist_ok=True)
    shutil.copy(root / "inputs" / "imagery" / "scene_001.tif", scenes / "scene_001.tif")
    with rasterio.open(scenes / "scene_001.tif", "r+", IGNORE_COG_LAYOUT_BREAK="YES") as dst:
        col, row = ~dst.transform @ (blank["transform"][2], blank["transform"][5])
        win = rasterio.windows.Window(round(col), round(row), blank["width"], blank["height"])
        dst.write(np.zeros((4, blank["height"], blank["width"]), np.uint16), window=win)
    catalog = load_catalog(write_catalog(root, TINY, imagery="inputs_bad/*.tif"))  # scene_000 is missing
    train = run_train_stage(catalog, vdir)
    pseudo = run_pseudo_label_stage(catalog, vdir)
    on_missing = set(sites.loc[sites["scene_id"] == "scene_000", "site_id"])
    assert any("without imagery" in n for n in train.notes) and any(
        "without imagery" in n for n in pseudo.notes
    )
    assert not on_missing & {p.stem for p in (vdir / "oos_probabilities").glob("*.tif")}
    assert any(blank["site_id"] in n and "all nodata or cloud" in n for n in pseudo.notes)
    with rasterio.open(vdir / "pseudo_probabilities" / f"{blank['site_id']}.tif") as src:
        assert np.isnan(src.read()).all()
    labels = read_table(vdir / "pseudo_labels")
    assert blank["site_id"] not in set(labels["site_id"])

    # nobody has labelled anything yet: no model, no pseudo-labels, valid empty tables
    empty = fresh_version(upstream, "v4")
    shutil.rmtree(empty / "consensus_rasters")
    (empty / "consensus_rasters").mkdir()
    a = pd.read_parquet(empty / "assignments.parquet")
    a.assign(status="pending", completed_at=pd.NaT).to_parquet(empty / "assignments.parquet")
    catalog = load_catalog(write_catalog(root, TINY))
    train = run_train_stage(catalog, empty)
    pseudo = run_pseudo_label_stage(catalog, empty)
    assert any("no model trained" in n for n in train.notes)
    assert any("no trained model" in n for n in pseudo.notes) and pseudo.counts["pseudo_polygons"] == 0
    thr = read_table(empty / "pseudo_label_thresholds.parquet")
    validate("pseudo_label_thresholds", thr)
    assert thr["threshold"].iloc[0] == np.inf and thr["n_polygons"].iloc[0] == 0


def test_gpu_and_cpu_tasks_run_on_their_workers(upstream):
    """One worker advertises GPU=1 (one thread), one CPU=64: GPU-annotated learn tasks land on the first,
    CPU-annotated tasks on the second, and a direct call runs in the flow process (no worker at all)."""
    import cloudpickle
    import dask
    from distributed import Client, Nanny, Scheduler, SpecCluster
    from prefect import flow, task
    from prefect_dask import DaskTaskRunner

    from flows.runtime import prefect_api
    from tasks.learn.tasks import pseudo_labels_task, train_task

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module

    @task(name="where")
    def where(i: int) -> str | None:
        try:
            from distributed import get_worker

            return get_worker().address
        except ValueError:
            return None

    vdir = fresh_version(upstream, "v5")
    catalog_path = str(upstream.parents[1] / "data_catalog.yaml")
    spec = {
        "gpu": {"cls": Nanny, "options": {"nthreads": 1, "resources": {"GPU": 1}}},
        "cpu": {"cls": Nanny, "options": {"nthreads": 1, "resources": {"CPU": 64}}},
    }
    with (
        prefect_api(),  # before the workers start, so they inherit PREFECT_API_URL
        SpecCluster(
            workers=spec, scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}}
        ) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(2)
        gpu = cluster.workers["gpu"].worker_address
        cpu = cluster.workers["cpu"].worker_address
        assert client.scheduler_info(n_workers=-1)["workers"][gpu]["nthreads"] == 1

        @flow(name="pinning", task_runner=DaskTaskRunner(address=cluster.scheduler_address))
        def pinned():
            with dask.annotate(resources={"GPU": 1}):
                trained = train_task.submit(catalog_path, str(vdir))
                pseudo = pseudo_labels_task.submit(catalog_path, str(vdir), trained)
                gpu_probe = where.submit(0)
            with dask.annotate(resources={"CPU": 1}):
                cpu_probes = [where.submit(i) for i in range(1, 5)]
            direct = where(99)  # a direct call: the flow process, pinned nowhere
            return (
                trained.result(),
                pseudo.result(),
                gpu_probe.result(),
                [f.result() for f in cpu_probes],
                direct,
            )

        trained, pseudo, gpu_probe, cpu_probes, direct = pinned()
    assert trained["placement"]["worker"] == gpu and pseudo["placement"]["worker"] == gpu
    assert trained["placement"]["torch_threads"] == 1  # sized to the one-thread worker
    # the folds and the final model: Dask tasks of their own, on the GPU worker too (queued on its thread)
    assert set(trained["placement"]["networks"].values()) == {gpu}
    assert gpu_probe == gpu and cpu_probes == [cpu] * 4 and direct is None
    assert (vdir / "model" / "model.pt").exists() and pseudo["counts"]["pseudo_sites"] > 0
