"""`cai stats`: what a run produced."""

import logging
from typing import Annotated, Optional

import typer

from cai.cli.root import app, reports_errors
from cai.cli.render import breakdown_table, err, setup_logging, stats_tables

log = logging.getLogger("cai")


@app.command("stats", epilog=(
    "[bold]Examples[/bold]\n\n"
    "  cai stats pairs.jsonl                          [dim]# reads pairs.jsonl.filtered.jsonl too, if there[/dim]\n\n"
    "  cai stats pairs.jsonl --json | jq .judge\n\n"
    "  cai stats pairs.jsonl --by principle           [dim]# the principles that yield nothing usable first[/dim]\n\n"
    "  cai stats pairs.jsonl --by tag -c my.yaml\n\n"
    "  cai stats pairs.jsonl --plot pairs.png         [dim]# needs matplotlib: pip install 'cai[plot]'[/dim]\n\n"
    "  cat pairs.jsonl | cai stats - --filtered dropped.jsonl"))
@reports_errors
def stats(
    pairs: Annotated[str, typer.Argument(help="A file written by cai generate (either format), or - for stdin.", show_default=False)],
    filtered: Annotated[Optional[str], typer.Option("--filtered", help="The side file of dropped records [default: PAIRS.filtered.jsonl when it exists; none for stdin].", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout instead of tables on stderr.")] = False,
    by: Annotated[Optional[str], typer.Option("--by", metavar="principle|tag", help="Also break the figures down per principle, or per tag of the constitution's principles (a principle with two tags counts in both): kept rate, drop reasons, edit size, judge mean and agreement, worst first.", show_default=False)] = None,
    constitution: Annotated[Optional[str], typer.Option("--constitution", "-c", help="With --by tag: the constitution whose principles' tags to use [default: the shipped one the records name].", show_default=False)] = None,
    plot_path: Annotated[Optional[str], typer.Option("--plot", metavar="FILE.png", help="Also draw lengths, similarity, judge preference and drop reasons into a PNG (needs matplotlib).", show_default=False)] = None,
) -> None:
    """What a run produced: kept and dropped records (by reason and principle), lengths, how much
    the revisions changed, the judge's preferences and finish reasons."""
    import json

    from cai import stats as stats_mod
    from cai.output import check_writable

    from cai.breakdown import KEYS, breakdown
    from cai.errors import OptionError

    setup_logging(False)
    if by is not None and by not in KEYS:
        raise OptionError("by", f"unknown value '{by}'; choose from {', '.join(KEYS)}")
    if constitution is not None and by != "tag":
        raise OptionError("constitution", "is for --by tag")
    if plot_path is not None:
        stats_mod.check_plotting()
        check_writable(plot_path)
    report, samples = stats_mod.collect(pairs, filtered, warn=lambda message: log.warning("%s", message))
    if by is not None:
        report["by"] = breakdown(samples, by, constitution)
    if plot_path is not None:
        stats_mod.plot(report, samples, plot_path)
    if as_json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        stats_tables(report)
        if by is not None:
            breakdown_table(report["by"])
    if plot_path is not None:
        err.print(f"wrote {plot_path}", highlight=False)
