"""Scale out: ``labelrefinery refresh`` against an existing cluster — a real ``prefect server``, ``dask
scheduler``, a CPU worker (``CPU=64``) and a GPU worker (``GPU=1``) as separate processes (tests/topology.py).

Checks the published version, where each stage ran (the scheduler's task stream) and that the flow run
and its task runs are recorded, Completed, in that server.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tasks.demo import generate_demo_region
from tasks.store.versions import VersionStore
from tests.topology import Topology, executable

REPO = Path(__file__).resolve().parents[1]
GPU_STAGES = {"train", "pseudo_labels"}
CPU_STAGES = {"ingest", "consensus", "label_issues", "report"}
REFRESH_TIMEOUT_S = 300


def stage_of(key) -> str | None:
    """The stage of a Dask key submitted by the refresh flow: prefect-dask names it ``<task fn>-<token>``."""
    name = str(key).rsplit("-", 1)[0]
    stage = name.removesuffix("_task")
    return stage if stage != name and stage in GPU_STAGES | CPU_STAGES else None


@pytest.fixture(scope="module")
def refreshed(topology: Topology, tmp_path_factory):
    """A tiny demo region refreshed through the topology; (catalog path, CLI result, task stream)."""
    root = tmp_path_factory.mktemp("topology_region")
    generate_demo_region(root, scale=1, seed=5, sites_per_side=3)
    catalog = yaml.safe_load((REPO / "data_catalog.yaml").read_text(encoding="utf-8"))
    catalog["root"] = "."
    catalog.setdefault("settings", {})["learn"] = {"steps": 20}
    path = root / "data_catalog.yaml"
    path.write_text(yaml.safe_dump(catalog, sort_keys=False), encoding="utf-8")
    before = len(topology.task_stream())
    with topology.logs_on_failure():
        proc = subprocess.run(
            [
                executable("labelrefinery"), "refresh", "--catalog", str(path),
                "--dask-address", topology.scheduler_address,
            ],
            cwd=root,  # not the repository: the workers must find the catalog by its absolute path
            env=topology.env,
            capture_output=True,
            text=True,
            timeout=REFRESH_TIMEOUT_S,
        )  # fmt: skip
        assert proc.returncode == 0, f"refresh failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return path.resolve(), proc, topology.task_stream()[before:]


def test_refresh_on_the_cluster_publishes_a_version(refreshed):
    catalog, proc, _ = refreshed
    store = VersionStore(catalog.parent)
    assert len(store.list()) == 1 and store.latest_id() == store.list()[0]
    vid = store.latest_id()
    assert f"published version {vid}" in proc.stdout
    vdir = store.version_path(vid)
    manifest = json.loads((vdir / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["stages"] == ["ingest", "consensus", "train", "pseudo_labels", "label_issues", "report"]
    expected = {
        "sites", "labels", "site_consensus", "consensus_labels", "model", "oos_probabilities",
        "pseudo_labels", "pseudo_label_thresholds", "label_issues", "assignment_issues", "metrics",
    }  # fmt: skip
    assert expected <= set(manifest["artifacts"]), expected - set(manifest["artifacts"])
    for name, rec in manifest["artifacts"].items():
        assert (vdir / rec["path"]).exists(), name
        assert rec["rows"] > 0 or name not in expected, name
    assert (vdir / "model" / "model.pt").stat().st_size > 0
    assert (vdir / "report" / "index.html").exists()
    assert not [p for p in store.dir.iterdir() if p.name.startswith(".draft-")]


def test_gpu_stages_ran_on_the_gpu_worker_and_cpu_stages_did_not(refreshed, topology):
    catalog, _, stream = refreshed
    gpu, cpu = topology.gpu_worker_address, topology.cpu_worker_address
    store = VersionStore(catalog.parent)
    placement = store.manifest(store.latest_id())["placement"]  # the learn stages record their worker
    assert placement["train"] == gpu and placement["pseudo_labels"] == gpu, placement
    where: dict[str, set[str]] = {}
    for rec in stream:
        stage = stage_of(rec["key"])
        if stage:
            where.setdefault(stage, set()).add(rec["worker"])
    assert set(where) == GPU_STAGES | CPU_STAGES, where
    for stage in GPU_STAGES:
        assert where[stage] == {gpu}, (stage, where[stage])
    for stage in CPU_STAGES:
        assert where[stage] == {cpu}, (stage, where[stage])


def test_cpu_stage_fan_out_stays_off_the_gpu_worker(refreshed, topology):
    """The Dask tasks a CPU stage fans out (ingest's raster statistics, consensus batches…) ask for CPU
    too, so the GPU worker's one thread stays free for the GPU stages; the train stage's networks (3 folds
    + the final model, ``run_fit``) and the pseudo-label stage's predictions (``predict_chunk``) fan out
    onto the GPU worker, queued on its one thread, while the GPU stages' CPU work (writing the training
    tiles, threshold evidence, vectorising) goes to the CPU worker."""
    _, _, stream = refreshed
    nested = [r for r in stream if not stage_of(r["key"])]
    fits = [r for r in nested if str(r["key"]).startswith("run_fit-")]
    assert len(fits) == 4 and {r["worker"] for r in fits} == {topology.gpu_worker_address}, fits
    predictions = [r for r in nested if str(r["key"]).startswith("predict_chunk-")]
    assert predictions and {r["worker"] for r in predictions} == {topology.gpu_worker_address}, predictions
    for name in ("write_tile_chunk-", "evidence_chunk-", "vectorise_chunk-"):
        assert any(str(r["key"]).startswith(name) for r in nested), name
    cpu_nested = [r for r in nested if r not in fits and r not in predictions]
    assert len(cpu_nested) >= 4, "ingest, consensus and label_issues fan out"
    on_gpu = sorted({str(r["key"])[:40] for r in cpu_nested if r["worker"] == topology.gpu_worker_address})
    assert not on_gpu, on_gpu


def test_flow_run_and_task_runs_are_completed_in_the_server(refreshed, topology):
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId

    catalog, _, _ = refreshed
    with topology.prefect_client() as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["refresh"])))
        runs = [r for r in runs if Path(r.parameters.get("catalog_path", "")).resolve() == catalog]
        assert len(runs) == 1, [(r.name, r.parameters) for r in runs]
        run = runs[0]
        assert run.state is not None and run.state.is_completed(), run.state
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    names = {tr.name.rsplit("-", 1)[0] for tr in task_runs}
    assert names >= GPU_STAGES | CPU_STAGES, names
    assert all(tr.state is not None and tr.state.is_completed() for tr in task_runs), [
        (tr.name, tr.state_type) for tr in task_runs if not (tr.state and tr.state.is_completed())
    ]
