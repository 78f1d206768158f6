"""``labelrefinery`` command line: the demo, refreshes, versions and the standalone label tools."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer
import yaml
from rich.table import Table

from flows.cli_common import (
    DEFAULT_CATALOG,
    USER_ERRORS,
    CatalogOpt,
    console,
    fail,
    load_catalog_or_exit,
    print_published,
)
from tasks.store.versions import VersionStore

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)


def _refresh(
    catalog: Path,
    dask_address: str | None,
    workers: int | None,
    wait: float,
    reuse: bool = True,
    refit: bool = True,
) -> dict:
    cat = load_catalog_or_exit(catalog)
    from flows.refresh import run_refresh

    try:
        with console.status(f"refreshing [bold]{cat.name}[/] (ingest on Dask)…"):
            return run_refresh(
                str(catalog),
                dask_address=dask_address,
                n_workers=workers,
                lock_wait_s=wait,
                reuse=reuse,
                refit=refit,
            )
    except USER_ERRORS as exc:
        fail(exc)


@app.command()
def demo(
    root: Path = typer.Option(Path("demo_region"), help="Folder for the generated region and its versions."),
    scale: int = typer.Option(1, min=1, help="Multiply the number of scenes and sites (for benchmarks)."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same region."),
    sites_per_side: int = typer.Option(
        8, min=3, help="Sites per scene side (sites per scene = this squared)."
    ),
    generate_only: bool = typer.Option(False, help="Generate the region without running refresh."),
) -> None:
    """Generate the embedded demo region and run the refresh flow on it."""
    from tasks.demo import generate_demo_region

    root = root.resolve()
    with console.status(f"generating demo region (scale {scale}, seed {seed}) in {root}…"):
        summary = generate_demo_region(root, scale=scale, seed=seed, sites_per_side=sites_per_side)
    console.print(
        f"demo region: {summary.n_scenes} scenes, {summary.n_sites} sites, {summary.n_labellers} labellers "
        f"({summary.seconds:.1f} s)"
    )
    catalog = yaml.safe_load(DEFAULT_CATALOG.read_text(encoding="utf-8"))
    catalog["root"] = "."
    (root / "data_catalog.yaml").write_text(
        "# Written by `labelrefinery demo`; the repository's data_catalog.yaml with root set here.\n"
        + yaml.safe_dump(catalog, sort_keys=False),
        encoding="utf-8",
    )
    if generate_only:
        return
    t0 = time.perf_counter()
    result = _refresh(root / "data_catalog.yaml", None, None, 0.0)
    print_published(result, root)
    console.print(f"  refresh took {time.perf_counter() - t0:.1f} s")


@app.command()
def refresh(
    catalog: Path = CatalogOpt,
    dask_address: str = typer.Option(None, help="Existing Dask scheduler, e.g. tcp://127.0.0.1:8786."),
    workers: int = typer.Option(
        None, help="Workers of the local cluster (default from infra/dask_local.yaml)."
    ),
    wait: float = typer.Option(0.0, help="Seconds to wait for another refresh on the same root to finish."),
    full: bool = typer.Option(False, help="Recompute every site instead of reusing unchanged results."),
    refit: bool = typer.Option(
        True, help="Refit labeller skills, the model and thresholds (--no-refit carries them)."
    ),
) -> None:
    """Run every stage on the catalog's inputs and publish a new version."""
    result = _refresh(catalog, dask_address, workers, wait, reuse=not full, refit=refit)
    print_published(result, Path(result["path"]).parents[1])


@app.command()
def ingest(catalog: Path = CatalogOpt) -> None:
    """Validate and ingest the inputs in this process (no Prefect, no cluster); print what would publish."""
    import tempfile

    from tasks.ingest.stage import run_ingest

    cat = load_catalog_or_exit(catalog)
    with tempfile.TemporaryDirectory(prefix="labelrefinery-ingest-") as tmp:
        try:
            with console.status("ingesting…"):
                result = run_ingest(cat, tmp)
        except USER_ERRORS as exc:
            fail(exc)
    table = Table(title=f"ingest of {cat.name}: inputs valid")
    table.add_column("artifact")
    table.add_column("rows", justify="right")
    for name, rec in result.artifacts.items():
        table.add_row(name, str(rec["rows"]))
    console.print(table)
    console.print(", ".join(f"{k}={v}" for k, v in result.counts.items()))


@app.command()
def versions(catalog: Path = CatalogOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """List published versions, newest last, with a manifest summary each."""
    cat = load_catalog_or_exit(catalog)
    store = VersionStore(cat.root_path)
    latest = store.latest_id()
    rows = []
    for vid in store.list():
        m = store.manifest(vid)
        rows.append(
            {
                "version_id": vid,
                "latest": vid == latest,
                "created_at": m.get("created_at"),
                "git_sha": (m.get("code_version") or {}).get("git_sha"),
                "counts": m.get("counts", {}),
                "artifacts": {k: v["rows"] for k, v in m.get("artifacts", {}).items()},
            }
        )
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    if not rows:
        console.print(f"no published versions under {store.dir}")
        return
    table = Table(title=f"versions of {cat.name} ({store.dir})")
    for col in ("version", "created", "code", "sites", "polygons", "artifacts"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["version_id"] + (" [bold green](latest)[/]" if r["latest"] else ""),
            r["created_at"] or "",
            (r["git_sha"] or "")[:8],
            str(r["counts"].get("sites", "")),
            str(r["counts"].get("polygons", "")),
            ", ".join(f"{k}:{v}" for k, v in r["artifacts"].items()),
        )
    console.print(table)


def _register_standalone() -> None:
    from flows.cli_operations import register
    from flows.standalone import find_label_issues, item_consensus

    register(app)
    app.command("item-consensus")(item_consensus)
    app.command("find-label-issues")(find_label_issues)
    from flows.serve import serve

    app.command("serve")(serve)


_register_standalone()

if __name__ == "__main__":
    app()
