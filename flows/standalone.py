"""Stand-alone commands on plain files, for use outside the pipeline (the main CLI registers them).

Kept as bare functions with ``typer.Option`` parameters, so ``flows.cli`` owns the single Typer app
and these stay importable and testable on their own. Bad input exits with code 2 and a one-line
message naming the file and row, never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tasks.consensus.items import run_item_consensus
from tasks.learn.item_issues import run_find_label_issues


def fail(err: Exception) -> typer.Exit:
    Console(stderr=True).print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


def item_consensus(
    *,
    labels: Annotated[Path, typer.Option(help="CSV/Parquet with columns item_id, labeller_id, label.")],
    gold: Annotated[
        Path | None, typer.Option(help="Optional CSV/Parquet with columns item_id, label.")
    ] = None,
    method: Annotated[str, typer.Option(help="'ds' (Dawid–Skene EM) or 'mv' (majority vote).")] = "ds",
    out: Annotated[
        Path, typer.Option(help="Output .csv/.parquet; .labellers/.confusion files go beside it.")
    ],
) -> None:
    """One label per image from several labellers, with posterior and per-labeller accuracy."""
    try:
        res = run_item_consensus(labels, gold_path=gold, method=method, out_path=out)
    except ValueError as err:  # InputError is a ValueError
        raise fail(err) from None
    console = Console()
    items = res.items
    console.print(
        f"[bold]{len(items)}[/] items, {len(res.labellers)} labellers, {len(res.classes)} classes; "
        f"method={method}, EM iterations={res.n_iter}, converged={res.converged}; "
        f"gold items={int((items['method'] == 'gold').sum())}; "
        f"mean posterior={items['posterior'].mean():.3f}",
        highlight=False,
    )
    worst = res.labellers.sort_values("accuracy").head(5)
    table = Table("labeller", "n", "accuracy", "90% interval", "basis", title="Least accurate labellers")
    for row in worst.itertuples():
        table.add_row(
            str(row.labeller_id),
            str(row.n_labels),
            f"{row.accuracy:.3f}",
            f"{row.accuracy_lo:.3f}–{row.accuracy_hi:.3f}",
            str(row.accuracy_basis),
        )
    console.print(table)
    console.print(f"wrote {out}", highlight=False)


def find_label_issues(
    labels: Annotated[Path, typer.Option(help="Given labels: .npy, .csv or .parquet (integer class ids).")],
    pred_probs: Annotated[Path, typer.Option(help="Out-of-sample probabilities: .npy or .parquet (n x K).")],
    out: Annotated[
        Path | None, typer.Option(help="Output .csv/.parquet; omitted: print the top issues.")
    ] = None,
) -> None:
    """Flag images whose given label is probably wrong (confident learning)."""
    try:
        res = run_find_label_issues(labels, pred_probs, out_path=out)
    except ValueError as err:
        raise fail(err) from None
    n_issues = int(res["is_issue"].sum())
    Console().print(
        f"[bold]{n_issues}[/] of {len(res)} images flagged ({n_issues / len(res):.2%})"
        + (f"; wrote {out}" if out is not None else ""),
        highlight=False,
    )
