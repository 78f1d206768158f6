"""What produced a version: code version, catalog content and hashes, for the manifest."""

from __future__ import annotations

import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from schemas.catalog import Catalog
from tasks.store.artifacts import file_hash

REPO = Path(__file__).resolve().parents[2]


def code_version() -> dict:
    """Package version plus the git commit (and whether the tree had uncommitted changes)."""
    try:
        pkg = version("labelrefinery")
    except PackageNotFoundError:
        pkg = "unknown"
    sha, dirty = None, None
    try:
        sha = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        pass
    return {"package": pkg, "git_sha": sha, "git_dirty": dirty}


def catalog_record(cat: Catalog) -> dict:
    return {
        "path": str(cat.path),
        "hash": file_hash(cat.path) if cat.path else None,
        "name": cat.name,
        "content": cat.model_dump(mode="json", by_alias=True),
    }
