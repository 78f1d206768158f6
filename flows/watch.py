"""The label watcher: announce label changes as the Prefect event ``labelrefinery.labels.updated``.

Each check compares the label inputs with the last published version (``tasks/ingest/changes.py``). It is
debounced twice: the label files must have been still for ``quiet_s`` (a labelling tool writing a burst of
edits gives one announcement), and a change set is announced once (again only if it is still unpublished
after ``renotify_s``). The ``reprocess`` deployment's trigger then fires at most once per ``debounce_s``.
The event names the changed sites for people reading it; the flow it triggers works out the changes itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from schemas.catalog import Catalog
from tasks.ingest.changes import LabelChanges, detect_label_changes
from tasks.store.reuse import content_key
from tasks.store.versions import atomic_write_text

EVENT = "labelrefinery.labels.updated"
MAX_SITES_IN_EVENT = 500


def dataset_resource(catalog: Catalog) -> dict[str, str]:
    """The event resource of a dataset root (the reprocess trigger matches on its id)."""
    root = str(catalog.root_path)
    return {
        "prefect.resource.id": f"labelrefinery.dataset.{content_key(root)[:16]}",
        "prefect.resource.name": catalog.name,
        "labelrefinery.root": root,
    }


def _state_path(catalog: Catalog) -> Path:
    return catalog.root_path / ".cache" / "watch_state.json"


def _read_state(catalog: Catalog) -> dict:
    try:
        return json.loads(_state_path(catalog).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _label_files(catalog: Catalog) -> list[Path]:
    names = ("input_labels", "input_assignments")
    return [Path(catalog.input_path(n)) for n in names if Path(catalog.input_path(n)).exists()]


@dataclass(frozen=True)
class Check:
    """One check's finding; ``status``: unpublished, settling, unchanged, announced or already_announced."""

    status: str
    changes: LabelChanges | None = None
    event_id: str | None = None


def check_once(
    catalog: Catalog, quiet_s: float, renotify_s: float, emit=None, now: float | None = None
) -> Check:
    """One watcher step; ``emit(catalog, changes) -> event id`` announces (default: the Prefect event)."""
    now = time.time() if now is None else now
    newest = max((p.stat().st_mtime for p in _label_files(catalog)), default=0.0)
    if now - newest < quiet_s:
        return Check("settling")
    changes = detect_label_changes(catalog)
    if changes.published_version is None:
        return Check("unpublished", changes)
    if not changes.sites:
        return Check("unchanged", changes)
    state = _read_state(catalog)
    if state.get("fingerprint") == changes.fingerprint and now - state.get("announced_at", 0) < renotify_s:
        return Check("already_announced", changes)
    event_id = (emit or emit_label_event)(catalog, changes)
    path = _state_path(catalog)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        path, json.dumps({"fingerprint": changes.fingerprint, "announced_at": now, "event_id": event_id})
    )
    return Check("announced", changes, event_id)


def emit_label_event(catalog: Catalog, changes: LabelChanges) -> str:
    """Send the event to the Prefect server in PREFECT_API_URL and wait until it is delivered."""
    if not os.environ.get("PREFECT_API_URL"):
        raise RuntimeError(
            "no Prefect server to announce to: set PREFECT_API_URL (start one with `prefect server start`)"
        )
    from prefect.events import Event
    from prefect.events.clients import get_events_client

    sites = changes.sites
    event = Event(
        event=EVENT,
        resource=dataset_resource(catalog),
        payload={
            "catalog": str(catalog.path),
            "published_version": changes.published_version,
            "n_sites": len(sites),
            "sites": sites[:MAX_SITES_IN_EVENT],
            "changed": len(changes.changed),
            "added": len(changes.added),
            "removed": len(changes.removed),
            "fingerprint": changes.fingerprint,
        },
    )

    async def _send() -> None:
        async with get_events_client() as client:
            await client.emit(event)

    asyncio.run(_send())
    return str(event.id)


def watch(catalog: Catalog, once: bool = False, report=print) -> Check:
    """Check every ``watch_interval_s`` (or once); returns the last check."""
    s = catalog.settings.schedule
    while True:
        result = check_once(catalog, s.quiet_s, s.renotify_s)
        if result.status == "announced":
            report(f"announced {len(result.changes.sites)} changed site(s): event {result.event_id}")
        elif result.status == "unpublished":
            report("nothing published yet: run `labelrefinery refresh` (or the nightly deployment) first")
        if once:
            return result
        time.sleep(s.watch_interval_s)
