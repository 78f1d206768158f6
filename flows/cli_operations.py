"""CLI commands for unattended operation: ``deploy``, ``watch``, ``reprocess`` (flows/operations.py)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from flows.cli_common import (
    USER_ERRORS,
    CatalogOpt,
    console,
    err,
    fail,
    load_catalog_or_exit,
    print_published,
)


def _require_server() -> str:
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        err.print(
            "[bold red]error:[/] no Prefect server: start one (`prefect server start`, SQLite by default; "
            "PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://… for production) and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api",
            markup=True,
            highlight=False,
        )
        raise typer.Exit(2)
    return url


def deploy(
    catalog: Path = CatalogOpt,
    dask_address: str = typer.Option(None, help="Existing Dask scheduler the runs use (else a local one)."),
    watcher: bool = typer.Option(True, help="Also serve the scheduled label watcher."),
) -> None:
    """Register and serve the nightly-refresh, reprocess (label-triggered) and watch-labels deployments."""
    cat = load_catalog_or_exit(catalog)
    url = _require_server()
    from flows.operations import serve_deployments

    s = cat.settings.schedule
    console.print(f"serving deployments of [bold]{cat.name}[/] against {url}")
    console.print(f"  nightly-refresh/{cat.name}: cron {s.cron!r} ({s.timezone})")
    console.print(
        f"  reprocess/{cat.name}: on labelrefinery.labels.updated, at most once per {s.debounce_s:g} s"
    )
    if watcher:
        console.print(f"  watch-labels/{cat.name}: every {s.watch_interval_s:g} s")
    serve_deployments(str(catalog.resolve()), dask_address, watcher)


def watch(
    catalog: Path = CatalogOpt,
    once: bool = typer.Option(False, help="Check once and exit (for cron or tests)."),
) -> None:
    """Announce label changes since the last published version as Prefect events."""
    cat = load_catalog_or_exit(catalog)
    _require_server()
    from flows.watch import watch as watch_loop

    try:
        result = watch_loop(cat, once=once, report=console.print)
    except USER_ERRORS as exc:
        fail(exc)
    console.print(f"watch: {result.status}")


def reprocess(
    catalog: Path = CatalogOpt,
    dask_address: str = typer.Option(None, help="Existing Dask scheduler, e.g. tcp://127.0.0.1:8786."),
) -> None:
    """Recompute only what depends on the labels changed since the last published version."""
    load_catalog_or_exit(catalog)
    from flows.operations import reprocess as reprocess_flow
    from flows.runtime import prefect_api

    try:
        with prefect_api(), console.status("reprocessing changed sites…"):
            result = reprocess_flow(str(catalog.resolve()), dask_address)
    except USER_ERRORS as exc:
        fail(exc)
    if result.get("skipped"):
        console.print(f"labels unchanged since version {result['version_id']}: nothing published")
        return
    console.print(f"{len(result['changed_sites'])} changed site(s)")
    print_published(result, Path(result["path"]).parents[1])


def register(app: typer.Typer) -> None:
    app.command()(deploy)
    app.command()(watch)
    app.command()(reprocess)
