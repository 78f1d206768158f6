"""Fine-grained Dask parallelism from inside a coarse Prefect task."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import dask
from distributed import get_worker, worker_client
from distributed.worker import thread_state

CPU = "CPU"  # the resource CPU workers advertise (infra/dask_local.yaml)


def _stage_restrictions() -> dict | None:
    """Resource restrictions of the task running in this thread ({} when it has none); None off a worker."""
    try:
        worker = get_worker()
    except ValueError:
        return None
    ts = worker.state.tasks.get(getattr(thread_state, "key", None))
    return dict(ts.resource_restrictions or {}) if ts is not None else {}


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
    restrictions = _stage_restrictions()
    if restrictions is None:
        yield None
        return
    annotate = dask.annotate(resources={r: 0 for r in restrictions}) if restrictions else nullcontext()
    with worker_client() as client, annotate:
        yield client


def cpu_resources(client) -> dict | None:
    """What tasks of CPU work (reading, rasterising, vectorising) made inside ``cluster_scheduler`` ask
    for instead of the stage's kind: zero ``CPU`` units where the stage runs on another kind of worker (a
    GPU stage: ``GPU=1``) and some worker advertises ``CPU``, so the GPU worker's thread stays on torch.
    None (ask as the stage does) for a CPU stage, a cluster without CPU workers, or no client."""
    restrictions = _stage_restrictions()
    if client is None or not restrictions or CPU in restrictions:
        return None
    info = client.sync(client.scheduler.identity, n_workers=-1)  # not the client's cache: it may lack workers
    if not any(CPU in (w.get("resources") or {}) for w in info["workers"].values()):
        return None
    return {CPU: 0}


class FanOut:
    """The jobs of one fan-out: Dask tasks on ``client`` (from ``cluster_scheduler``, made inside its
    block), else plain calls, made at once in the order given. Either way ``compute`` returns the results
    in the structure it was given them, so a stage reads the same results whatever ran where."""

    def __init__(self, client):
        self.client = client
        self._cpu = cpu_resources(client)

    def stage(self, fn, *args):
        """A job on the stage's kind of worker (torch: GPU workers for a GPU stage)."""
        return fn(*args) if self.client is None else dask.delayed(fn, pure=False)(*args)

    def cpu(self, fn, *args):
        """A job of CPU work: on CPU workers where there are some (``cpu_resources``)."""
        if self.client is None:
            return fn(*args)
        with dask.annotate(resources=self._cpu) if self._cpu else nullcontext():
            return dask.delayed(fn, pure=False)(*args)

    def compute(self, *results):
        return results if self.client is None else dask.compute(*results, scheduler=self.client)
