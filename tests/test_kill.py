"""A refresh killed with SIGKILL mid-write leaves the previous version intact; the next refresh recovers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from schemas.catalog import load_catalog
from tasks.ingest.stage import run_ingest
from tasks.store.artifacts import file_hash
from tasks.store.versions import DRAFT_PREFIX, LATEST, VersionStore

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="process groups and /proc: Linux only")


def _command() -> list[str]:
    exe = Path(sys.executable).with_name("labelrefinery")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "flows.cli"]


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): file_hash(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _drafts(store: VersionStore) -> list[Path]:
    return [p for p in store.dir.iterdir() if p.name.startswith(DRAFT_PREFIX)]


def _live_members(pgid: int) -> list[int]:
    """Processes of the group that are still running (zombies awaiting their reaper do not count)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                live.append(int(stat.parent.name))
    return live


def test_kill_9_mid_refresh_then_recover(make_catalog, tmp_path, topology):
    """Both refreshes talk to the session's Prefect server (as production runs do), which spares each a
    temporary server's start; the killed one's own Dask cluster dies with its process group."""
    cat_path = make_catalog(tmp_path / "region", settings={"learn": {"steps": 20}})  # a short model
    catalog = load_catalog(cat_path)
    store = VersionStore(catalog.root_path)
    with store.lock():
        draft = store.new_draft()
        draft.artifacts.update(run_ingest(catalog, draft.path).artifacts)
        store.publish(draft, {"note": "first"})
    first = draft.version_id
    before = _snapshot(store.version_path(first))
    latest_before = (store.dir / LATEST).read_bytes()

    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(
        [*_command(), "refresh", "--catalog", str(cat_path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=cat_path.parent,
        env=topology.env,
        start_new_session=True,  # its own process group: its Dask workers die with it
    )
    try:
        deadline = time.monotonic() + 240
        while True:  # kill once the draft holds its first artifact files: mid-write, before publishing
            written = [f for d in _drafts(store) for f in d.rglob("*") if f.is_file()]
            if written:
                break
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()
            assert time.monotonic() < deadline, "the refresh never started writing a draft"
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()
    deadline = time.monotonic() + 20
    while _live_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _live_members(proc.pid) == []

    # The kill landed before publishing: the draft is left behind, and nothing readers see has changed.
    stale = _drafts(store)
    assert len(stale) == 1 and any(stale[0].iterdir())
    assert store.list() == [first] and store.latest_id() == first
    assert (store.dir / LATEST).read_bytes() == latest_before
    assert _snapshot(store.version_path(first)) == before

    # The next refresh takes the (released) lock, removes the stale draft and publishes.
    done = subprocess.run(
        [*_command(), "refresh", "--catalog", str(cat_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cat_path.parent,
        env={**topology.env, "COLUMNS": "250"},
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "removed 1 draft(s) left by interrupted runs" in output
    versions = store.list()
    assert len(versions) == 2 and versions[0] == first and store.latest_id() == versions[1]
    assert f"published version {versions[1]}" in output
    assert not stale[0].exists() and _drafts(store) == []
    assert _snapshot(store.version_path(first)) == before
    manifest = store.manifest(versions[1])
    for name in ("sites", "tiles", "labels", "assignments", "item_labels"):
        assert (store.version_path(versions[1]) / manifest["artifacts"][name]["path"]).exists(), name
    assert manifest["counts"]["sites"] == 18
