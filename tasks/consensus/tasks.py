"""Prefect wrapper of the consensus stage: one coarse task; batches of sites fan out on Dask inside it."""

from __future__ import annotations

from dataclasses import asdict

from prefect import task

from schemas.catalog import load_catalog
from tasks.consensus.run import run_consensus_stage
from tasks.parallel import cluster_scheduler
from tasks.store.errors import retry_on_transient_io
from tasks.store.reuse import Reuse


@task(name="consensus", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_on_transient_io)
def consensus_task(
    catalog_path: str, version_dir: str, ingest_done: dict | None = None, reuse: Reuse | None = None
) -> dict:
    """Consensus artifacts into the version draft ``version_dir`` (after ingest wrote its tables there);
    ``reuse`` names the previous version whose unchanged per-site results are taken over."""
    catalog = load_catalog(catalog_path)
    with cluster_scheduler():
        result = run_consensus_stage(catalog, version_dir, reuse=reuse)
    return asdict(result)
