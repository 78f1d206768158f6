"""Unattended operation: the nightly refresh, label-triggered reprocessing, the label watcher, and the
deployments that serve them against a real Prefect server (``labelrefinery deploy``).

- ``nightly-refresh``: cron from the catalog; reuses unchanged per-site results and refits global
  parameters (labeller skills, the model, thresholds) exactly.
- ``reprocess``: run by a ``DeploymentEventTrigger`` on ``labelrefinery.labels.updated``; works out
  itself what changed since the last published version (an automation passes only the event), keeps the
  model and carries global parameters within their tolerances, and recomputes only what depends on the
  change. A run that finds nothing changed publishes nothing.
- ``watch-labels``: the watcher as a scheduled flow (or run ``labelrefinery watch``).
All three allow one run at a time (later runs queue), and every refresh also holds the root's lock.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from prefect import flow, get_run_logger

from flows.refresh import refresh
from flows.runtime import covered_by_parent_heartbeat, task_runner
from flows.watch import EVENT, dataset_resource
from flows.watch import watch as watch_loop
from schemas.catalog import load_catalog
from tasks.ingest.changes import detect_label_changes


@flow(name="nightly-refresh", log_prints=False)
def nightly_refresh(catalog_path: str, dask_address: str | None = None) -> dict:
    """Scheduled full refresh: reuse what is unchanged, refit every global parameter."""
    catalog = load_catalog(catalog_path)
    runner = task_runner(dask_address)
    with covered_by_parent_heartbeat():
        return refresh.with_options(task_runner=runner)(
            catalog_path, lock_wait_s=catalog.settings.schedule.lock_wait_s, reuse=True, refit=True
        )


@flow(name="reprocess", log_prints=False)
def reprocess(
    catalog_path: str, dask_address: str | None = None, trigger_event_id: str | None = None
) -> dict:
    """Reprocess what depends on the labels changed since the last published version."""
    logger = get_run_logger()
    catalog = load_catalog(catalog_path)
    changes = detect_label_changes(catalog)
    if changes.published_version is not None and not changes.sites:
        logger.info("labels unchanged since version %s: nothing to do", changes.published_version)
        return {"skipped": True, "version_id": changes.published_version, "changed_sites": []}
    logger.info(
        "event %s: %d site(s) changed since version %s",
        trigger_event_id,
        len(changes.sites),
        changes.published_version,
    )
    with covered_by_parent_heartbeat():
        result = refresh.with_options(task_runner=task_runner(dask_address))(
            catalog_path,
            lock_wait_s=catalog.settings.schedule.lock_wait_s,
            reuse=True,
            refit=changes.published_version is None,  # a first run has nothing to carry
        )
    return {**result, "skipped": False, "changed_sites": changes.sites}


@flow(name="watch-labels", log_prints=True)
def watch_labels(catalog_path: str) -> str:
    """One watcher check (scheduled every ``watch_interval_s`` by ``labelrefinery deploy``)."""
    return watch_loop(load_catalog(catalog_path), once=True).status


def deployments(catalog_path: str | Path, dask_address: str | None = None, watcher: bool = True) -> list:
    """The deployments of one dataset, named after the catalog (``nightly-refresh/<name>`` ...)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule
    from prefect.events import DeploymentEventTrigger

    catalog = load_catalog(catalog_path)
    s = catalog.settings.schedule
    path = str(Path(catalog_path).resolve())
    one_at_a_time = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
    params = {"catalog_path": path, "dask_address": dask_address}
    tags = ["labelrefinery", catalog.name]
    out = [
        nightly_refresh.to_deployment(
            name=catalog.name,
            schedules=[CronSchedule(cron=s.cron, timezone=s.timezone)],
            parameters=params,
            concurrency_limit=one_at_a_time,
            tags=tags,
            description=f"Nightly refresh of {catalog.name} ({s.cron}, {s.timezone}).",
        ),
        reprocess.to_deployment(
            name=catalog.name,
            triggers=[
                DeploymentEventTrigger(
                    name=f"labels updated: {catalog.name}",
                    expect={EVENT},
                    match={"prefect.resource.id": dataset_resource(catalog)["prefect.resource.id"]},
                    threshold=1,
                    within=timedelta(seconds=s.debounce_s),
                    parameters={**params, "trigger_event_id": "{{ event.id | string }}"},
                )
            ],
            parameters=params,
            concurrency_limit=one_at_a_time,
            tags=tags,
            description=f"Reprocess {catalog.name} when its labels change.",
        ),
    ]
    if watcher:
        out.append(
            watch_labels.to_deployment(
                name=catalog.name,
                schedules=[IntervalSchedule(interval=timedelta(seconds=s.watch_interval_s))],
                parameters={"catalog_path": path},
                concurrency_limit=ConcurrencyLimitConfig(
                    limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
                ),
                tags=tags,
                description=f"Announce label changes of {catalog.name}.",
            )
        )
    return out


def serve_deployments(
    catalog_path: str | Path, dask_address: str | None = None, watcher: bool = True
) -> None:
    """Register the deployments with the server in PREFECT_API_URL and run their flow runs (blocks)."""
    from prefect import serve

    serve(*deployments(catalog_path, dask_address, watcher), print_starting_message=True)
