"""`cai judge`: AI-feedback preference labels for finished pairs."""

from typing import Annotated, Optional

import typer

from cai.cli.root import app, reports_errors
from cai.cli.options import declared
from cai.options import JudgeOptions
from cai.cli.render import err, judge_rows, setup_logging, summary_table


@app.command("judge", epilog=(
    "[bold]Examples[/bold]\n\n"
    "  cai judge pairs.jsonl -o judged.jsonl                       [dim]# the embedded model as judge[/dim]\n\n"
    "  cai judge pairs.jsonl --model Qwen/Qwen2.5-1.5B-Instruct --min-preference 0.6 -o kept.jsonl\n\n"
    "  cai judge pairs.jsonl --backend openai --base-url http://gpu:8000/v1 --model judge --swap --clamp 0.4,0.6 -o -"))
@reports_errors
@declared(JudgeOptions, exclude=("filter", "similarity", "repairs", "repair_from", "drop_refusals", "judge"), config="judge")
def judge(
    pairs: Annotated[Optional[str], typer.Argument(help="A file written by cai generate (either format), or - for stdin. May come from --config instead.", show_default=False)] = None,
    output: Annotated[str, typer.Option("--output", "-o", rich_help_panel="Output and resume", help="Where judged records go: a .jsonl file, or - for stdout.")] = "-",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", rich_help_panel="Run", help="No progress bar or summary; errors only.")] = False,
    options: JudgeOptions = None,
) -> None:
    """AI-feedback preference labels (RL-CAI): the judge model answers the principle's question
    about the original (A/B) and the revision (B/A); its preference is read from the option tokens'
    log-probabilities and averaged over both orders. Adds a `judge` field to every record."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from cai.errors import OptionError
    from cai.run.judge import run
    from cai.run.summary import resolved

    if pairs is None:
        raise OptionError("pairs", "missing: give a pairs file (or - for stdin), or `pairs:` in --config")
    setup_logging(quiet)
    bar = Progress(TextColumn("[bold]judging"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=err, disable=quiet)
    tasks = []

    def progress(done: int, total: int) -> None:
        if not tasks:                   # the bar starts once the judge has loaded
            bar.start()
            tasks.append(bar.add_task("judging", total=total))
        bar.update(tasks[0], completed=done)

    try:
        summary = run(pairs, output, options, progress=progress)
    finally:
        bar.stop()
    if summary.stopped_by:
        err.print(f"[yellow]interrupted[/yellow]: {summary.written} judged records written", highlight=False)
        raise typer.Exit(summary.exit_code)
    if not quiet:
        table = summary_table("cai judge")
        table.add_row("judge", summary.model)
        table.add_row("pairs read", str(summary.read))
        table.add_row("records written", str(summary.written))
        if summary.curation.get("active"):
            reasons = " · ".join(f"{r} {c}" for r, c in summary.curation["reasons"].items())
            table.add_row("dropped (filters)", f"{summary.curation['dropped']}" + (f" ({reasons})" if reasons else ""))
        for name, value in judge_rows(summary.curation):
            table.add_row(name, value)
        table.add_row("time", f"{summary.elapsed:.1f} s")
        table.add_row("output", resolved(output))
        err.print(table)
