"""`cai stats`: what a run produced."""

import logging
from typing import Annotated, Optional

import typer

from cai.cli.app import app, reports_errors
from cai.cli.render import err, setup_logging, stats_tables

log = logging.getLogger("cai")


@app.command("stats", epilog=(
    "[bold]Examples[/bold]\n\n"
    "  cai stats pairs.jsonl                          [dim]# reads pairs.jsonl.filtered.jsonl too, if there[/dim]\n\n"
    "  cai stats pairs.jsonl --json | jq .judge\n\n"
    "  cai stats pairs.jsonl --plot pairs.png         [dim]# needs matplotlib: pip install 'cai[plot]'[/dim]\n\n"
    "  cat pairs.jsonl | cai stats - --filtered dropped.jsonl"))
@reports_errors
def stats(
    pairs: Annotated[str, typer.Argument(help="A file written by cai generate (either format), or - for stdin.", show_default=False)],
    filtered: Annotated[Optional[str], typer.Option("--filtered", help="The side file of dropped records [default: PAIRS.filtered.jsonl when it exists; none for stdin].", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout instead of tables on stderr.")] = False,
    plot_path: Annotated[Optional[str], typer.Option("--plot", metavar="FILE.png", help="Also draw lengths, similarity, judge preference and drop reasons into a PNG (needs matplotlib).", show_default=False)] = None,
) -> None:
    """What a run produced: kept and dropped records (by reason and principle), lengths, how much
    the revisions changed, the judge's preferences and finish reasons."""
    import json

    from cai import stats as stats_mod
    from cai.output import check_writable

    setup_logging(False)
    if plot_path is not None:
        stats_mod.check_plotting()
        check_writable(plot_path)
    report, samples = stats_mod.collect(pairs, filtered, warn=lambda message: log.warning("%s", message))
    if plot_path is not None:
        stats_mod.plot(report, samples, plot_path)
    if as_json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        stats_tables(report)
    if plot_path is not None:
        err.print(f"wrote {plot_path}", highlight=False)
