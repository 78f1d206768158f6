"""Handing free memory back between Dask tasks (tasks/memory.py)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from tasks.memory import release_memory, releasing_memory, trim_heap


def _rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc are Linux's")
def test_trim_heap_returns_freed_small_blocks_to_the_os():
    # many small blocks (below the mmap threshold) come from the heap and stay there once freed
    blocks = [np.ones(1000) for _ in range(60_000)]  # ~480 MB of 8 KB blocks
    keep = blocks[-1]
    del blocks
    before = _rss_kib()
    assert trim_heap()
    after = _rss_kib()
    assert before - after > 100_000, (before, after)  # > ~100 MB handed back
    assert keep.sum() == 1000


def test_releasing_memory_keeps_result_and_exceptions():
    @releasing_memory
    def task(x):
        if x < 0:
            raise ValueError("negative")
        return [x] * 3

    assert task(2) == [2, 2, 2]
    assert task.__name__ == "task"
    with pytest.raises(ValueError, match="negative"):
        task(-1)
    release_memory()  # callable on its own, whatever the platform's allocator
