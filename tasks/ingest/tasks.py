"""Prefect wrapper of the ingest stage: one coarse task; Dask parallelism inside it."""

from __future__ import annotations

from dataclasses import asdict

from prefect import task

from schemas.catalog import load_catalog
from tasks.ingest.stage import run_ingest
from tasks.parallel import cluster_scheduler
from tasks.store.errors import retry_on_transient_io
from tasks.store.reuse import Reuse


@task(name="ingest", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_on_transient_io)
def ingest_task(catalog_path: str, out_dir: str, reuse: Reuse | None = None) -> dict:
    """Ingest into ``out_dir`` (a version draft); returns the stage's manifest record.

    ``reuse``: the previous version to take unchanged tiles from (see :func:`run_ingest`).
    """
    catalog = load_catalog(catalog_path)
    with cluster_scheduler():
        result = run_ingest(catalog, out_dir, reuse=reuse)
    return asdict(result)
