"""Immutable, atomically published dataset versions under ``<root>/versions/``.

A refresh writes into a hidden draft folder on the same filesystem and publishes it with one
``rename``; only then is ``LATEST`` switched (itself replaced atomically). Readers that follow
``LATEST`` or list published folders never see a half-written version, and a killed run leaves at most
a stale draft, which the next run removes.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

DRAFT_PREFIX = ".draft-"
LATEST = "LATEST"
MANIFEST = "manifest.json"


class RefreshLocked(RuntimeError):
    """Another refresh holds the dataset root's lock."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file so readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@dataclass
class Draft:
    """A version being built; nothing in it is visible until :meth:`VersionStore.publish`."""

    version_id: str
    path: Path
    artifacts: dict[str, dict] = field(default_factory=dict)

    def artifact_path(self, uri: str) -> Path:
        return self.path / uri


class VersionStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.dir = self.root / "versions"

    # ---- reading -------------------------------------------------------------------------------
    def latest_id(self) -> str | None:
        """The version ``LATEST`` names; if someone deleted that folder by hand, the newest published
        version left (with a warning), so the next refresh builds on what exists instead of failing."""
        try:
            named = json.loads((self.dir / LATEST).read_text(encoding="utf-8"))["version_id"]
        except FileNotFoundError:
            return None
        if (self.dir / named / MANIFEST).exists():
            return named
        left = self.list()
        warnings.warn(
            f"{self.dir / LATEST} names version {named!r}, whose folder is gone; "
            + (f"using the newest published version left, {left[-1]}" if left else "no version is left"),
            stacklevel=2,
        )
        return left[-1] if left else None

    def version_path(self, version_id: str) -> Path:
        path = (self.dir / version_id).resolve()
        if path.parent != self.dir.resolve() or version_id.startswith("."):
            raise ValueError(f"not a version id: {version_id!r}")
        return path

    def manifest(self, version_id: str) -> dict:
        return json.loads((self.version_path(version_id) / MANIFEST).read_text(encoding="utf-8"))

    def list(self) -> list[str]:
        """Published version ids, oldest first (ids sort by creation time)."""
        if not self.dir.exists():
            return []
        return sorted(
            p.name
            for p in self.dir.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).exists()
        )

    # ---- writing -------------------------------------------------------------------------------
    @contextmanager
    def lock(self, wait_s: float = 0.0) -> Iterator[None]:
        """Hold the root's refresh lock; wait up to ``wait_s`` seconds, then raise :class:`RefreshLocked`."""
        self.root.mkdir(parents=True, exist_ok=True)
        fh = open(self.root / ".refresh.lock", "a+")  # noqa: SIM115 (held for the whole block)
        deadline = time.monotonic() + wait_s
        try:
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() >= deadline:
                        raise RefreshLocked(
                            f"{self.root}: another refresh is running on this dataset root "
                            f"(lock file {self.root / '.refresh.lock'}); try again when it has finished"
                        ) from None
                    time.sleep(0.5)
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()}\n")
            fh.flush()
            yield
        finally:
            fh.close()

    def ensure_unlocked(self, wait_s: float = 0.0) -> None:
        """Raise :class:`RefreshLocked` now (after waiting up to ``wait_s`` seconds) when another refresh
        holds the lock; otherwise return without holding it."""
        with self.lock(wait_s):
            pass

    def remove_stale_drafts(self) -> list[str]:
        """Delete drafts left by killed runs; call only while holding :meth:`lock`."""
        removed = []
        if self.dir.exists():
            for p in self.dir.iterdir():
                if p.name.startswith(DRAFT_PREFIX):
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p.name)
        return removed

    def new_draft(self) -> Draft:
        now = dt.datetime.now(dt.UTC)
        version_id = now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z-{uuid.uuid4().hex[:6]}"
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{DRAFT_PREFIX}{version_id}"
        path.mkdir()
        return Draft(version_id, path)

    def discard(self, draft: Draft) -> None:
        shutil.rmtree(draft.path, ignore_errors=True)

    def publish(self, draft: Draft, manifest: dict) -> Path:
        """Write the manifest, rename the draft into place, then switch ``LATEST``."""
        manifest = {**manifest, "version_id": draft.version_id, "artifacts": draft.artifacts}
        with open(draft.path / MANIFEST, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=2, sort_keys=True, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        for p in draft.path.rglob("*"):
            # a hard link into an earlier version (reused results) was made durable when that version was
            # published; only the files this run wrote need syncing (a reprocess links ~97 % of them)
            if p.is_file() and p.stat().st_nlink == 1:
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        final = self.dir / draft.version_id
        os.rename(draft.path, final)
        _fsync_dir(self.dir)
        atomic_write_text(self.dir / LATEST, json.dumps({"version_id": draft.version_id}) + "\n")
        return final
