"""Content hashes of input files without rereading the unchanged ones.

A JSON file under the dataset root (``<root>/.cache/file_hashes.json``) maps each absolute path to the
``(size, mtime_ns, inode)`` it had when it was hashed, and the hash. A file whose stat still matches is
not read again; any change of size, mtime or inode rehashes it. A missing or corrupt cache is simply
recomputed, and a cache that cannot be written (read-only root) only costs the rereads.

Racy entries: a file changed again within the filesystem's timestamp granularity after being hashed can
keep its old mtime (and size). As git does for its index, an entry whose mtime is not clearly older than
the moment its hashing began (``RACY_NS``) is never trusted: such a file is rehashed until it has aged.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from tasks.store import artifacts

CACHE_FILE = Path(".cache") / "file_hashes.json"
RACY_NS = 2_000_000_000  # 2 s: covers coarse (1-2 s) filesystem timestamps and the kernel's coarse clock
_VERSION = 1


def cache_path(root: str | Path) -> Path:
    """Where the dataset rooted at ``root`` keeps its file-hash cache."""
    return Path(root) / CACHE_FILE


class HashCache:
    """``hash(path)``: the file's BLAKE2b (:func:`tasks.store.artifacts.file_hash`), reusing a cached
    value while the file's size, mtime and inode are unchanged; ``save()`` writes the cache back."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, dict] = self._load()
        self._updated: dict[str, dict] = {}
        self.hits = 0
        self.misses = 0

    @classmethod
    def for_root(cls, root: str | Path) -> HashCache:
        return cls(cache_path(root))

    def _load(self) -> dict[str, dict]:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("version") != _VERSION:
            return {}
        files = data.get("files")
        if not isinstance(files, dict):
            return {}
        return {p: e for p, e in files.items() if _well_formed(e)}

    def hash(self, path: str | Path) -> str:
        p = os.path.abspath(path)
        st = os.stat(p)
        stat = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
        entry = self._updated.get(p) or self.entries.get(p)
        if entry is not None and all(entry[k] == v for k, v in stat.items()) and not _racy(entry):
            self.hits += 1
            return entry["hash"]
        self.misses += 1
        started = time.time_ns()
        digest = artifacts.file_hash(p)
        after = os.stat(p)
        if (after.st_size, after.st_mtime_ns, after.st_ino) == tuple(stat.values()):
            # Only a stat that held across the whole read describes the bytes that were hashed.
            self._updated[p] = {**stat, "hashed_at_ns": started, "hash": digest}
        return digest

    def save(self) -> None:
        """Merge this run's entries into the cache file (atomically); drop entries of vanished files."""
        if self.path is None or not self._updated:
            return
        try:
            merged = {**self._load(), **self._updated}
            merged = {p: e for p, e in sorted(merged.items()) if os.path.exists(p)}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".file_hashes-", suffix=".tmp", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    json.dump({"version": _VERSION, "files": merged}, fh, indent=1)
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError:
            return  # a cache that cannot be written costs rereads next time, nothing else
        self.entries, self._updated = merged, {}


def _well_formed(entry) -> bool:
    return (
        isinstance(entry, dict)
        and all(isinstance(entry.get(k), int) for k in ("size", "mtime_ns", "inode", "hashed_at_ns"))
        and isinstance(entry.get("hash"), str)
    )


def _racy(entry: dict) -> bool:
    return entry["mtime_ns"] >= entry["hashed_at_ns"] - RACY_NS
