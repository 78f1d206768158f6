"""The ``refresh`` flow: every stage of the design card, in order, into one atomically published version.

Thin wiring only: each stage is one coarse Prefect task submitted to Dask (with the resource its kind
of worker advertises); the work and the fine-grained parallelism live in ``tasks/``.
"""

from __future__ import annotations

import time
from pathlib import Path

import dask
from prefect import flow, get_run_logger

from flows.runtime import stage_resources
from schemas.catalog import load_catalog
from tasks.consensus.tasks import consensus_task
from tasks.ingest.tasks import ingest_task
from tasks.learn.issues_tasks import label_issues_task
from tasks.learn.tasks import pseudo_labels_task, train_task
from tasks.report import build_reports_index
from tasks.report.tasks import report_task
from tasks.store.provenance import catalog_record, code_version
from tasks.store.reuse import Reuse
from tasks.store.versions import VersionStore


@flow(name="refresh", log_prints=False, retries=0)
def refresh(catalog_path: str, lock_wait_s: float = 0.0, reuse: bool = True, refit: bool = True) -> dict:
    """Build a new version from the catalog's inputs and publish it; earlier versions are never touched.

    ``reuse``: take over per-site results of the latest version whose input keys are unchanged (False: a
    full refresh recomputes everything). ``refit``: refit global parameters (labeller skills, the model,
    thresholds) exactly; False carries them within their tolerances, as label-triggered reprocessing does.
    """
    logger = get_run_logger()
    t_flow = time.perf_counter()
    catalog_path = str(Path(catalog_path).resolve())
    catalog = load_catalog(catalog_path)
    store = VersionStore(catalog.root_path)
    with store.lock(wait_s=lock_wait_s):
        stale = store.remove_stale_drafts()
        if stale:
            logger.warning("removed %d draft(s) left by interrupted runs", len(stale))
        previous = store.latest_id()
        draft = store.new_draft()
        out = str(draft.path)
        prev_dir = str(store.version_path(previous)) if previous else None
        plan = Reuse(previous_dir=prev_dir, enabled=reuse, refit=refit)
        stages: dict[str, dict] = {}
        try:
            with dask.annotate(resources=stage_resources("cpu")):
                ingest = ingest_task.submit(catalog_path, out, reuse=plan)
                consensus = consensus_task.submit(catalog_path, out, ingest, reuse=plan)
            with dask.annotate(resources=stage_resources("gpu")):
                train = train_task.submit(catalog_path, out, consensus, reuse=plan)
                pseudo = pseudo_labels_task.submit(catalog_path, out, train, reuse=plan)
            with dask.annotate(resources=stage_resources("cpu")):
                issues = label_issues_task.submit(catalog_path, out, train, reuse=plan)
            stages["ingest"] = ingest.result()
            stages["consensus"] = consensus.result()
            stages["train"] = train.result()
            stages["pseudo_labels"] = pseudo.result()
            stages["label_issues"] = issues.result()
            for stage in stages.values():
                draft.artifacts.update(stage["artifacts"])
            cat_rec, code = catalog_record(catalog), code_version()
            provenance = {
                "inputs": stages["ingest"]["inputs"],
                "catalog": {k: cat_rec[k] for k in ("path", "hash", "name")},
                "code_version": code,
                "parameters": catalog.settings.model_dump(mode="json"),
                "stage_timings": {name: s["timings"] for name, s in stages.items()},
            }
            with dask.annotate(resources=stage_resources("cpu")):
                upstream = [issues, pseudo]
                report = report_task.submit(
                    catalog_path, out, prev_dir, provenance, upstream=upstream, reuse=plan
                )
            stages["report"] = report.result()
            draft.artifacts.update(stages["report"]["artifacts"])
            timings = {name: sum(s["timings"].values()) for name, s in stages.items()}
            manifest = {
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "catalog": cat_rec,
                "inputs": stages["ingest"]["inputs"],
                "code_version": code,
                "parameters": provenance["parameters"],
                "counts": {k: v for stage in stages.values() for k, v in stage.get("counts", {}).items()},
                "stages": list(stages),
                "notes": [n for s in stages.values() for n in s.get("notes", [])],
                "stage_timings": {name: s["timings"] for name, s in stages.items()},
                "stage_seconds": timings,
                "reuse": {"previous_version": previous, "enabled": reuse, "refit": refit},
                "placement": {name: s.get("placement", {}).get("worker") for name, s in stages.items()},
                "flow_seconds_before_publish": time.perf_counter() - t_flow,
            }
            final = store.publish(draft, manifest)
        except BaseException:
            store.discard(draft)
            raise
        build_reports_index(catalog.root_path)
    logger.info("published version %s at %s", draft.version_id, final)
    return {
        "version_id": draft.version_id,
        "path": str(final),
        "counts": manifest["counts"],
        "report": str(final / "report" / "index.html"),
    }


def run_refresh(
    catalog_path: str,
    dask_address: str | None = None,
    n_workers: int | None = None,
    lock_wait_s: float = 0.0,
    reuse: bool = True,
    refit: bool = True,
) -> dict:
    """Run ``refresh`` on a Dask cluster with a Prefect API the workers can reach.

    Another refresh holding the root's lock is refused (after ``lock_wait_s``) before a Prefect server or a
    Dask cluster is started for nothing; the flow still takes the lock itself."""
    from flows.runtime import prefect_api, task_runner

    VersionStore(load_catalog(catalog_path).root_path).ensure_unlocked(lock_wait_s)
    with prefect_api():
        runner = task_runner(dask_address, n_workers)
        return refresh.with_options(task_runner=runner)(
            catalog_path, lock_wait_s=lock_wait_s, reuse=reuse, refit=refit
        )
