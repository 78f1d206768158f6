"""What every CLI module shares: consoles, the catalog option, loading a catalog, user-error handling."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from flows.runtime import configure_environment
from schemas.catalog import CatalogError, load_catalog
from schemas.tables import SchemaViolation
from tasks.store.errors import InputError
from tasks.store.versions import RefreshLocked

console = Console()
err = Console(stderr=True)

DEFAULT_CATALOG = Path(__file__).resolve().parents[1] / "data_catalog.yaml"
CatalogOpt = typer.Option(DEFAULT_CATALOG, "--catalog", "-c", help="Path to a data_catalog.yaml.")
USER_ERRORS = (InputError, CatalogError, SchemaViolation, RefreshLocked)


def fail(exc: Exception) -> None:
    err.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def load_catalog_or_exit(catalog: Path):
    try:
        cat = load_catalog(catalog)
    except CatalogError as exc:
        fail(exc)
    configure_environment(cat.root_path)
    return cat


def print_published(result: dict, root: Path) -> None:
    console.print(f"[bold green]published version[/] {result['version_id']}")
    console.print(f"  artifacts: {result['path']}")
    console.print(f"  manifest:  {Path(result['path']) / 'manifest.json'}")
    counts = ", ".join(f"{k}={v}" for k, v in result["counts"].items())
    console.print(f"  counts:    {counts}")
    console.print(f"  versions:  labelrefinery versions --catalog {root / 'data_catalog.yaml'}")
    if result.get("report"):
        console.print(f"  report:    {result['report']}")
        console.print(f"  browse:    labelrefinery serve --catalog {root / 'data_catalog.yaml'}")
