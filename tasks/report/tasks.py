"""Prefect wrapper of the report stage, plus the markdown artifact that puts the headline numbers and the
report's location in the Prefect UI next to the flow run."""

from __future__ import annotations

import html
from dataclasses import asdict
from pathlib import Path

from prefect import get_run_logger, task

from schemas.catalog import load_catalog
from tasks.report.metrics import HEADLINE
from tasks.report.pages import fmt
from tasks.report.run import run_report_stage, version_id_of
from tasks.store.errors import retry_on_transient_io
from tasks.store.reuse import Reuse

ARTIFACT_KEY = "labelrefinery-report"


def _md(text: str) -> str:
    """Escape user text for markdown table cells (HTML and the pipe that would split the cell)."""
    return html.escape(str(text)).replace("|", "\\|").replace("\n", " ")


def published_location(report_index: str | Path) -> Path:
    """Where a report built in a draft will be once the draft is published (``.draft-<id>`` → ``<id>``)."""
    p = Path(report_index)
    parts = list(p.parts)
    for i, part in enumerate(parts):
        if part.startswith(".draft-"):
            parts[i] = version_id_of(Path(part))
    return Path(*parts)


def report_markdown(result: dict) -> str:
    """The artifact body: headline numbers, alerts and where the report is."""
    h = result.get("headline", {})
    lines = [
        "# labelrefinery report",
        "",
        f"Report: `{_md(published_location(result['report']))}`",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [
        f"| {label} | {fmt(h[key], kind)} |" for key, label, kind, _ in HEADLINE if h.get(key) is not None
    ]
    alerts = result.get("alerts", [])
    lines += ["", f"**Alerts: {len(alerts)}**", ""]
    lines += [f"- {_md(a['level'])}: {_md(a['message'])}" for a in alerts]
    return "\n".join(lines) + "\n"


@task(name="report", retries=1, retry_delay_seconds=[5], retry_condition_fn=retry_on_transient_io)
def report_task(
    catalog_path: str,
    version_dir: str,
    previous_version_dir: str | None = None,
    provenance: dict | None = None,
    upstream: object = None,
    reuse: Reuse | None = None,
) -> dict:
    """Build ``metrics.json`` and the static report in the draft; publish a Prefect markdown artifact.
    ``reuse``: the previous version whose unchanged report parts are taken over (None: build all)."""
    catalog = load_catalog(catalog_path)
    result = asdict(run_report_stage(catalog, version_dir, previous_version_dir, provenance, reuse=reuse))
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(
            key=ARTIFACT_KEY,
            markdown=report_markdown(result),
            description=f"Report of {catalog.name}: headline numbers and location",
        )
    except Exception as exc:  # the report on disk matters more than its notice in the UI
        get_run_logger().warning("could not create the Prefect report artifact: %s", exc)
    return result
