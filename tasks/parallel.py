"""Fine-grained Dask parallelism from inside a coarse Prefect task."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from distributed import get_worker, worker_client


@contextmanager
def cluster_scheduler() -> Iterator[object | None]:
    """Make ``dask.compute`` inside the block use the whole cluster.

    On a Dask worker this is a ``worker_client``, which secedes the waiting task from the worker's thread
    pool: with one thread per worker (the GPU worker's setting) a plain ``Client`` — what
    ``prefect_dask.get_dask_client`` opens — deadlocks when the scheduler queues the inner tasks behind
    the task that waits for them. Outside a worker nothing changes (Dask's local threads).
    """
    try:
        get_worker()
    except ValueError:
        yield None
        return
    with worker_client() as client:
        yield client
