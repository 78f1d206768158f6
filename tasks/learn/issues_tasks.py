"""Prefect wrapper of the label_issues stage: one coarse task; batches of sites fan out on Dask inside it."""

from __future__ import annotations

from dataclasses import asdict

from prefect import task

from schemas.catalog import load_catalog
from tasks.learn.label_issues import run_label_issues_stage
from tasks.parallel import cluster_scheduler
from tasks.store.errors import retry_on_transient_io
from tasks.store.reuse import Reuse


@task(name="label_issues", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_on_transient_io)
def label_issues_task(
    catalog_path: str, version_dir: str, upstream: dict | None = None, reuse: Reuse | None = None
) -> dict:
    """``label_issues`` and ``assignment_issues`` into the version draft ``version_dir``.

    ``upstream`` is only an ordering handle: pass the training stage's future (model probabilities in
    ``oos_probabilities/``) or, without one, the consensus stage's (then the consensus is the stand-in).
    ``reuse``: what may be taken over from the last published version (None = compute everything).
    """
    catalog = load_catalog(catalog_path)
    with cluster_scheduler():
        result = run_label_issues_stage(catalog, version_dir, reuse)
    return asdict(result)
