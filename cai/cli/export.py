"""`cai export`: pairs into other shapes and files."""

from typing import Annotated, Optional

import typer

from cai.cli.app import app, reports_errors
from cai.cli.options import NoLockOpt
from cai.cli.render import err


@app.command("export", epilog=(
    "[bold]Examples[/bold]\n\n"
    "  cai export pairs.jsonl --format conversational -o pairs.chat.jsonl\n\n"
    "  cai export pairs.jsonl --format sft -o sft.jsonl            [dim]# prompt + final revision (SL-CAI)[/dim]\n\n"
    "  cai export pairs.jsonl -o pairs.parquet --test-size 0.1     [dim]# pairs.train.parquet, pairs.test.parquet[/dim]"))
@reports_errors
def export(
    pairs: Annotated[str, typer.Argument(help="A file written by cai generate (either format), or - for stdin.", show_default=False)],
    output: Annotated[str, typer.Option("--output", "-o", help="Output .jsonl or .parquet file, or - for stdout (JSONL).")] = "-",
    fmt: Annotated[str, typer.Option("--format", "-f", metavar="standard|conversational|sft", help="Shape to write.")] = "standard",
    test_size: Annotated[Optional[float], typer.Option("--test-size", help="Fraction (0-1) held out into OUT.test.*; the rest goes to OUT.train.*.", show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the train/test split (by record id, so stable under reordering).")] = 0,
    no_lock: NoLockOpt = False,
) -> None:
    """Convert pairs between shapes: standard, conversational, or an SFT file; JSONL or Parquet."""
    from cai.run.export import export as export_pairs

    summary = export_pairs(pairs, output, format=fmt, test_size=test_size, seed=seed, lock=not no_lock)
    for target, count in summary.written.items():
        if target != "-":
            err.print(f"wrote {count} {fmt} records to {target}", highlight=False)
