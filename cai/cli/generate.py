"""`cai generate`: parse the options, run the library's generation run, render what it returns."""

from typing import Annotated, Optional

import typer

from cai.cli.root import app, error_line, reports_errors, standalone
from cai.cli.options import declared
from cai.options import GenerateOptions
from cai.cli.render import RunProgress, err, generate_summary, setup_logging


@app.command(epilog=(
    "[bold]Examples[/bold]\n\n"
    "  cai generate examples/prompts.jsonl -o pairs.jsonl            [dim]# embedded SmolLM2-135M-Instruct[/dim]\n\n"
    "  cai generate prompts.txt --model Qwen/Qwen2.5-0.5B-Instruct --revisions 2 -o - | head\n\n"
    "  cat prompts.jsonl | cai generate - --constitution my.yaml -o pairs.jsonl\n\n"
    "  cai generate prompts.jsonl -o pairs.jsonl                      [dim]# run again: resumes where it stopped[/dim]"))
@reports_errors
@declared(GenerateOptions, config="generate")
def generate(
    prompts: Annotated[Optional[str], typer.Argument(help="Prompts: .jsonl (one object per line), .csv/.tsv (a header row), a text file (one prompt per line), any of them .gz/.bz2/.xz/.zst compressed; .parquet, .arrow/.feather, a folder saved by datasets, a Hub dataset id (owner/name); or - for stdin. May come from --config instead.", show_default=False)] = None,
    output: Annotated[str, typer.Option("--output", "-o", rich_help_panel="Output and resume", help="Where records go: a .jsonl file (named .jsonl.gz, .bz2, .xz or .zst: written compressed, resumable all the same), or - for stdout.")] = "-",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", rich_help_panel="Run", help="No progress bar, logs or summary; errors and the line saying what was not made still show.")] = False,
    options: GenerateOptions = None,
) -> None:
    """Generate (rejected, chosen) pairs from prompts.

    For each prompt the model answers, critiques its answer against a principle of the
    constitution, and revises it; one JSONL record per prompt is written as its conversation ends.
    """
    from cai.errors import OptionError
    from cai.run.generate import run
    from cai.signals import StopSignals

    if prompts is None:
        raise OptionError("prompts", "missing: give a prompts file (or - for stdin), or `prompts:` in --config")
    setup_logging(quiet)
    grace = options.grace

    def on_signal(name: str, seconds: float) -> None:
        err.print(f"[yellow]{name}: stopping: finishing the conversations in flight[/yellow] (up to {seconds:g} s; "
                  "Ctrl-C again to stop at once)", highlight=False)

    with StopSignals(grace, on_signal=on_signal, keep=standalone()) as stopper, RunProgress(quiet) as progress:
        summary = run(prompts, output, options, progress=progress, stop=stopper)
    if summary.nothing_to_do:
        if summary.problem():
            error_line(summary.problem())
        raise typer.Exit(summary.exit_code)
    if summary.stopped_by and summary.not_made:
        where = "stdout" if summary.output == "-" else summary.output
        err.print(f"[yellow]interrupted[/yellow] ({summary.stopped_by}): {summary.kept} records written to {where}."
                  + (" Run the same command again to continue where it stopped." if summary.output != "-" else ""),
                  highlight=False, soft_wrap=True)
    elif summary.stopped_by:
        err.print(f"[dim]{summary.stopped_by} came after the last prompt had started; every prompt finished[/dim]", highlight=False)
    if not quiet and not (summary.stopped_by and summary.not_made):
        generate_summary(summary)
    problem = summary.problem()
    if problem and not (summary.stopped_by and summary.not_made and not summary.failed and not summary.skipped):
        error_line(problem)
    raise typer.Exit(summary.exit_code)
