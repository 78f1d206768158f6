"""Fine-grained Dask parallelism from inside a coarse Prefect task."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import dask
from distributed import get_worker, worker_client
from distributed.worker import thread_state


@contextmanager
def cluster_scheduler() -> Iterator[object | None]:
    """Make ``dask.compute`` inside the block use the whole cluster.

    On a Dask worker this is a ``worker_client``, which secedes the waiting task from the worker's thread
    pool: with one thread per worker (the GPU worker's setting) a plain ``Client`` — what
    ``prefect_dask.get_dask_client`` opens — deadlocks when the scheduler queues the inner tasks behind
    the task that waits for them. The inner tasks ask for the kinds of resource of the task that submits
    them (Dask does not pass restrictions on by itself), so a CPU stage's fan-out stays on CPU workers and a
    GPU stage's on GPU workers. They ask for zero units of each: a seceded task keeps the units it holds,
    so on a worker with ``GPU=1`` inner tasks asking for one more would wait forever; how many run at once
    is then the workers' thread count, as for any task. Outside a worker nothing changes (Dask's local
    threads; the caller may also run its jobs itself).
    """
    try:
        worker = get_worker()
    except ValueError:
        yield None
        return
    ts = worker.state.tasks.get(getattr(thread_state, "key", None))
    restrictions = {r: 0 for r in (ts.resource_restrictions or {})} if ts is not None else {}
    annotate = dask.annotate(resources=restrictions) if restrictions else nullcontext()
    with worker_client() as client, annotate:
        yield client
