"""Manifest records of folder artifacts (per-site rasters), without rereading files a version shares.

A folder artifact's checksum is the BLAKE2b of its files' hashes in name order. The record also lists
each file's hash (``files``), so the next version, whose unchanged per-site rasters are hard links to
this version's files (``tasks.store.reuse.link_or_copy``), takes a linked file's hash from this record
instead of reading hundreds of megabytes again. Only a file that *is* the previous version's file (same
device and inode; published versions are immutable) is taken over: a copy, or a file written anew, is
hashed, so the checksum is always the one a full read gives.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tasks.store.artifacts import bytes_hash, file_hash
from tasks.store.versions import MANIFEST


def previous_record(previous_dir: str | Path | None, artifact: str) -> tuple[Path | None, dict]:
    """(the previous version's folder of ``artifact``, its manifest record); (None, {}) when unknown."""
    if previous_dir is None:
        return None, {}
    try:
        manifest = json.loads((Path(previous_dir) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, {}
    rec = (manifest.get("artifacts") or {}).get(artifact)
    if not isinstance(rec, dict) or "path" not in rec:
        return None, {}
    return Path(previous_dir) / rec["path"], rec


def folder_record(
    folder: str | Path,
    rel: str,
    pattern: str = "*.tif",
    previous_folder: str | Path | None = None,
    previous: dict | None = None,
) -> dict:
    """``{"path", "rows", "checksum", "files"}`` of the files of ``folder`` matching ``pattern``.

    ``previous_folder`` / ``previous``: the same artifact in the previous version and its manifest record
    (``previous_record``); a file hard-linked from there keeps the hash recorded for it.
    """
    folder = Path(folder)
    known = (previous or {}).get("files") or {}
    prev = Path(previous_folder) if previous_folder is not None else None
    files: dict[str, str] = {}
    for p in sorted(folder.glob(pattern)):
        h = known.get(p.name)
        if h is None or prev is None or not _same_file(p, prev / p.name):
            h = file_hash(p)
        files[p.name] = h
    return {
        "path": rel,
        "rows": len(files),
        "checksum": bytes_hash(*(h.encode() for h in files.values())),
        "files": files,
    }


def _same_file(a: Path, b: Path) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino, sa.st_size) == (sb.st_dev, sb.st_ino, sb.st_size)
