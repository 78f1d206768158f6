"""Handing freed memory back to the OS between Dask tasks, so a worker's resident memory tracks its
current task rather than the high-water mark of every task before it.

Allocators keep freed pages for reuse: Arrow's memory pool (per thread) and glibc's heap and arenas. On a
long-lived Dask worker that ratchets resident memory up with the number of batches even when live memory
is flat, which makes "memory bounded by the batch" untrue in practice.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from collections.abc import Callable
from functools import cache


@cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def trim_heap() -> bool:
    """glibc ``malloc_trim(0)``: return the heap's free pages; False (a no-op) without glibc."""
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    with contextlib.suppress(OSError):
        libc.malloc_trim(0)
        return True
    return False


def release_memory() -> None:
    """Return free pages to the OS: Arrow's pool for this thread, then glibc's heap."""
    import pyarrow as pa  # lazily: torch-only scripts import modules that use this file

    pa.default_memory_pool().release_unused()
    trim_heap()


def releasing_memory(task: Callable) -> Callable:
    """Decorate a Dask task so it calls ``release_memory`` when it ends, whether it returned or raised."""

    @functools.wraps(task)
    def run(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        finally:
            release_memory()

    return run
