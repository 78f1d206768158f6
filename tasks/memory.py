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
import os
import threading
from collections.abc import Callable
from contextlib import contextmanager
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


# glibc's mallopt parameters, and the values its own dynamic thresholds may grow to on 64-bit Linux.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_MAX, _TRIM_WHILE_SWEEPING = 32 << 20, 1 << 30
# Seconds after the last sweep ends before the thresholds are set back and the freed memory handed back:
# a worker sweeping scene after scene keeps its pages from one task to the next.
RELEASE_AFTER_S = 2.0
_malloc: dict = {"sweeps": 0, "lock": threading.Lock(), "timer": None}


@contextmanager
def keep_freed_memory():
    """While sweeps run in this process, and for ``RELEASE_AFTER_S`` after the last one ends, glibc keeps
    the memory they free for reuse.

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_`` set, which also freezes glibc's mmap
    threshold at 128 KiB: every larger block GDAL allocates (a decoded 256 px block of 4 bands is
    512 KiB, so are its zstd buffers) is a fresh mapping, unmapped when freed, so each block's pages are
    faulted in anew: 17 000 minor faults and 30-55 ms of system time per scene task of the demo region
    (2 cores). While any sweep runs the thresholds are raised; handing everything back at the end of
    each task still cost ~10 000 faults and 15-40 ms in the next one (its GDAL block cache and strips
    faulted in again), so the release waits until no sweep has run for ``RELEASE_AFTER_S``: then the
    thresholds are set back and ``malloc_trim(0)`` hands the freed memory to the OS, and a worker holds
    no more between stages than before. Without that variable (local threads), glibc's own thresholds
    already adapt, and nothing is changed.
    """
    trim = os.environ.get("MALLOC_TRIM_THRESHOLD_", "")
    libc = _libc() if trim.isdigit() else None
    if libc is not None and not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        libc = None
    if libc is None:
        yield
        return
    with _malloc["lock"]:
        if _malloc["timer"] is not None:  # a release was pending: the thresholds are still raised
            _malloc["timer"].cancel()
            _malloc["timer"] = None
        elif _malloc["sweeps"] == 0:
            libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX)
            libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_WHILE_SWEEPING)
        _malloc["sweeps"] += 1
    try:
        yield
    finally:
        with _malloc["lock"]:
            _malloc["sweeps"] -= 1
            if _malloc["sweeps"] == 0:
                timer = threading.Timer(RELEASE_AFTER_S, _release, (libc, int(trim)))
                timer.daemon = True
                _malloc["timer"] = timer
                timer.start()


def _release(libc, trim: int) -> None:
    """Set glibc's thresholds back and return the freed memory, unless a sweep started meanwhile."""
    with _malloc["lock"]:
        if _malloc["sweeps"] or _malloc["timer"] is not threading.current_thread():
            return  # a sweep started meanwhile (and cancelled this timer, maybe too late)
        _malloc["timer"] = None
        libc.mallopt(_M_MMAP_THRESHOLD, int(os.environ.get("MALLOC_MMAP_THRESHOLD_", 128 << 10)))
        libc.mallopt(_M_TRIM_THRESHOLD, trim)
        libc.malloc_trim(0)
