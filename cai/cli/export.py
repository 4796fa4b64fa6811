"""`cai export`: pairs into other shapes and files, or into a folder a trainer reads."""

from typing import Annotated, Optional

import typer

from cai.cli.root import app, reports_errors
from cai.cli.options import NoLockOpt
from cai.cli.render import err


@app.command("export", epilog=(
    "[bold]Examples[/bold]\n\n"
    "  cai export pairs.jsonl --to trl dpo-data/                     [dim]# data, trl_dpo.yaml, README.md card[/dim]\n\n"
    "  cai export pairs.jsonl --to llamafactory lf-data/ --test-size 0.05\n\n"
    "  cai export pairs.jsonl --format conversational -o pairs.chat.jsonl\n\n"
    "  cai export pairs.jsonl --format sft -o sft.jsonl            [dim]# prompt + final revision (SL-CAI)[/dim]\n\n"
    "  cai export pairs.jsonl -o pairs.parquet --test-size 0.1     [dim]# pairs.train.parquet, pairs.test.parquet[/dim]"))
@reports_errors
def export(
    pairs: Annotated[str, typer.Argument(help="A file written by cai generate (either format), or - for stdin (not with --to).", show_default=False)],
    folder: Annotated[Optional[str], typer.Argument(metavar="[DIR]", help="With --to: the folder to write.", show_default=False)] = None,
    to: Annotated[Optional[str], typer.Option("--to", metavar="trl|axolotl|openrlhf|llamafactory|nemo-rl|argilla", help="Write DIR for this trainer: its data shape, its config, a dataset card (README.md) and the command that trains; argilla: an Argilla ranking dataset (rg.Dataset.from_disk reads DIR).", show_default=False)] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="Without --to: output .jsonl or .parquet file, or - for stdout (JSONL).")] = "-",
    fmt: Annotated[str, typer.Option("--format", "-f", metavar="standard|conversational|sft", help="Without --to: shape to write.")] = "standard",
    test_size: Annotated[Optional[float], typer.Option("--test-size", help="Fraction (0-1) held out as a test split (by record id).", show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the train/test split (by record id, so stable under reordering).")] = 0,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="With --to: the model the config trains [default: the one that made the pairs].", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="With --to: write into a folder that is not empty.")] = False,
    push_to_hub: Annotated[Optional[str], typer.Option("--push-to-hub", metavar="REPO", help="With --to: upload the folder as a Hub dataset repository (needs network and a token).", show_default=False)] = None,
    review: Annotated[Optional[str], typer.Option("--review", help="The reviewer's decisions to apply (cai review) [default: PAIRS.review.jsonl when it exists].", show_default=False)] = None,
    no_review: Annotated[bool, typer.Option("--no-review", help="Ignore the reviewer's decisions: export the pairs as they are.")] = False,
    no_lock: NoLockOpt = False,
) -> None:
    """Convert pairs between shapes (standard, conversational, SFT; JSONL or Parquet), or write a
    folder that a trainer reads as it is (--to). Decisions made with cai review are applied:
    rejected and tied pairs left out, swapped ones swapped, edited chosen texts used."""
    from cai.errors import UsageError

    if no_review and review:
        raise UsageError("--review and --no-review: pick one")
    decisions = False if no_review else review

    if to is None:
        if folder is not None or model or overwrite or push_to_hub:
            raise UsageError("DIR, --model, --overwrite and --push-to-hub go with --to TRAINER")
        from cai.run.export import export as export_pairs

        summary = export_pairs(pairs, output, format=fmt, test_size=test_size, seed=seed, lock=not no_lock,
                               review=decisions)
        _review_line(summary.review)
        for target, count in summary.written.items():
            if target != "-":
                err.print(f"wrote {count} {fmt} records to {target}", highlight=False)
        return
    if folder is None:
        raise UsageError("--to needs the folder to write: cai export PAIRS --to TRAINER DIR")
    from cai.run.export import export_for

    result = export_for(pairs, to, folder, test_size=test_size, seed=seed, model=model, overwrite=overwrite,
                        push_to_hub=push_to_hub, lock=not no_lock, review=decisions)
    _review_line(result.review)
    counts = ", ".join(f"{split} {n}" for split, n in result.records.items())
    err.print(f"wrote {result.folder} for {to}: {counts} records; {', '.join(result.files)}", highlight=False, soft_wrap=True)
    if result.pushed:
        err.print(f"pushed to {result.pushed}", highlight=False)
    err.print("load with:" if to == "argilla" else "train with:", highlight=False)
    print(result.command)


def _review_line(review: dict | None) -> None:
    """'review (pairs.jsonl.review.jsonl): 2 rejected and 1 tied dropped, 1 swapped, 1 edited, …'."""
    if review is None:
        return
    from cai.review.decisions import Applied

    applied = Applied(review["file"], elsewhere=review["not_in_file"])
    applied.counts.update({k: v for k, v in review.items() if k in ("accept", "reject", "swap", "tie", "skip", "edit")})
    err.print(applied.line(), highlight=False, soft_wrap=True)
