"""`cai compare`: two output files, or two constitutions / template sets run on the same prompts.

The run options are `cai generate`'s own, borrowed from its signature (so the two never drift
apart), less those that name one run's files."""

from dataclasses import fields
from typing import Annotated, Optional

import typer

from cai.cli.root import app, reports_errors
from cai.cli.options import declared, option_names
from cai.cli.render import RunProgress, breakdown_table, err, reasons_cell, setup_logging, summary_table
from cai.options import GenerateOptions

# generate's options that compare sets itself, or that name one run's files
_NOT_BORROWED = {"constitution", "templates", "keep_filtered", "filtered", "failures", "skipped"}
_BORROWED = option_names(GenerateOptions, exclude=_NOT_BORROWED)


@app.command("compare", epilog=(
    "[bold]Examples[/bold]\n\n"
    "  cai compare a.jsonl b.jsonl                                   [dim]# two finished runs[/dim]\n\n"
    "  cai compare -c harmless -c my.yaml prompts.jsonl -o runs/     [dim]# runs/harmless.jsonl, runs/my.jsonl[/dim]\n\n"
    "  cai compare --templates default --templates minimal prompts.jsonl -o runs/ --judge --json > cmp.json"))
@reports_errors
@declared(GenerateOptions, exclude=_NOT_BORROWED)
def compare(
    inputs: Annotated[list[str], typer.Argument(help="Two output files of cai generate (each read with its side files), or, with two constitutions or two template sets, one prompts file (anything cai generate reads).", show_default=False)],
    constitution: Annotated[Optional[list[str]], typer.Option("--constitution", "-c", help="Run and compare these (give it twice): shipped names or YAML paths; given once, both sides use it.", show_default=False)] = None,
    templates: Annotated[Optional[list[str]], typer.Option("--templates", help="Template sets (give it twice to compare two); given once, both sides use it (default: the default set).", show_default=False)] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", metavar="DIR", help="With runs: the folder for them, DIR/LABEL.jsonl per side (a rerun resumes them).", show_default=False)] = None,
    show: Annotated[int, typer.Option("--show", metavar="N", help="Pairs kept by one side and dropped by the other to show in full, each way.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON on stdout (the tables still go to stderr unless --quiet).")] = False,
    plot_path: Annotated[Optional[str], typer.Option("--plot", metavar="FILE.png", help="Also draw kept pairs, drop reasons, edit size and judge preference per side (needs matplotlib).", show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress, logs or tables.")] = False,
    options: GenerateOptions = None,
) -> None:
    """Compare two runs side by side: pairs kept, drop reasons, refusals, lengths, edit size and
    the judge's preference and order agreement, overall and per principle, and the pairs one side
    kept and the other dropped."""
    import json

    from cai.errors import OptionError
    from cai.options import GenerateOptions
    from cai.run import compare as lib

    setup_logging(quiet)
    if plot_path is not None:
        from cai.output import check_writable
        from cai.stats import check_plotting

        check_plotting()
        check_writable(plot_path)
    constitutions, template_sets = constitution or [], templates or []
    if len(constitutions) < 2 and len(template_sets) < 2:
        if len(inputs) != 2:
            raise OptionError("constitution", "give two output files, or one prompts file with -c A -c B "
                                              "(or --templates A --templates B)")
        defaults = GenerateOptions()
        given = [name for name in _BORROWED if getattr(options, name) != getattr(defaults, name)]
        if given:
            raise OptionError(given[0], "is an option of the runs compare makes (-c A -c B "
                                        "or --templates A --templates B), not of two files")
        if constitutions or template_sets or output:
            raise OptionError("constitution" if constitutions else "templates" if template_sets else "output",
                              "is for comparing runs; with two files give neither")
        report = lib.compare_files(inputs[0], inputs[1], show=show)
    else:
        if len(inputs) != 1:
            raise OptionError("constitution", "comparing runs takes one prompts file")
        if not output:
            raise OptionError("output", "comparing runs needs a folder for them: -o DIR")
        report = lib.compare_runs(inputs[0], options, constitutions or ["harmless"], template_sets or ["default"],
                                  output, show=show, progress=_Progress(quiet))
        if not report["sides"]:
            err.print(f"[yellow]interrupted[/yellow]: {report['runs'][-1]['label']} did not finish; run the "
                      "same command again to continue", highlight=False)
            raise typer.Exit(130)
    if plot_path is not None:
        lib.plot(report, plot_path)
    if not quiet:
        tables(report)
    if as_json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
    if plot_path is not None and not quiet:
        err.print(f"wrote {plot_path}", highlight=False)


class _Progress:
    """Each run's progress bar in turn, named after its side."""

    def __init__(self, quiet: bool):
        self.quiet, self.bars = quiet, {}

    def __call__(self, label: str, phase: str, summary) -> None:
        if self.quiet or (summary is None and label not in self.bars):
            return
        if label not in self.bars:
            err.print(f"[bold]{label}[/bold]: {summary.constitution} → {summary.output}", highlight=False)
            self.bars[label] = RunProgress(False)
        if phase == "done":
            self.bars[label].__exit__(None, None, None)
            if summary is not None and summary.nothing_to_do:
                err.print("[dim]  already made (resumed)[/dim]")
        else:
            self.bars[label](phase, summary)


def tables(report: dict) -> None:
    left, right = report["sides"]

    def cell(side, key, kind="count"):
        value = side
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            return "–"
        if kind == "pct":
            return f"{value:.1%}"
        return f"{value:,}" if kind == "count" else f"{float(value):.3f}"

    table = summary_table("cai compare")
    table.columns[0].header = ""
    table.show_header = True
    table.add_column(right["label"], overflow="fold")
    table.columns[1].header = left["label"]
    rows = [("records", "records", None), ("pairs made", "made", "count"), ("kept", "kept", "count"),
            ("kept rate", "kept_rate", "pct"), ("failed", "failed", "count"), ("skipped", "skipped", "count"),
            ("refusals among kept (chosen)", "refusals", "count"),
            ("words: prompt (mean)", "words_mean.prompt", "float"),
            ("words: rejected (mean)", "words_mean.rejected", "float"),
            ("words: chosen (mean)", "words_mean.chosen", "float"),
            ("edit distance (mean, kept)", "edit.distance_mean", "float"),
            ("edit distance (median, kept)", "edit.distance_p50", "float"),
            ("edit spans (mean, kept)", "edit.spans_mean", "float"),
            ("edit distance (mean, dropped)", "edit.distance_dropped_mean", "float"),
            ("judged", "judge.judged", "count"), ("judge: P(revision better)", "judge.mean_preference", "float"),
            ("judge: orders agree", "judge.agreement", "pct")]
    for name, key, kind in rows:
        if kind is None:
            table.add_row(name, str(left[key]), str(right[key]))
        else:
            table.add_row(name, cell(left, key, kind), cell(right, key, kind))
    table.add_row("dropped by reason", reasons_cell(left["dropped_by_reason"]), reasons_cell(right["dropped_by_reason"]))
    err.print(table)
    for side in (left, right):
        breakdown_table({"key": "principle", "groups": side["principles"]}, title=f"{side['label']}: by principle")
    diff = report["differences"]
    kept_only = " · ".join(f"kept only by {label}: {count}" for label, count in diff["kept_only_by"].items())
    err.print(f"matched pairs: {diff['matched']} · kept by both: {diff['kept_both']} · dropped by both: "
              f"{diff['dropped_both']} · {kept_only}", highlight=False, soft_wrap=True)
    for example in diff["examples"]:
        err.rule(f"{example['id']}: kept by {example['kept_by']}")
        if example["prompt"]:
            err.print(f"[bold]prompt[/bold]: {example['prompt']}", highlight=False, markup=True)
        for label in (left["label"], right["label"]):
            side = example[label]
            verdict = "kept" if side["kept"] else f"dropped ({', '.join(side['reasons']) or '?'})"
            err.print(f"[bold]{label}[/bold] · {side['principle']} · {verdict}"
                      + (f" · edit {side['edit']['distance']:.3f}" if side.get("edit") else "")
                      + (f" · judge {side['preference']:.3f}" if side.get("preference") is not None else ""),
                      highlight=False, markup=True)
            if side["chosen"] is not None:
                err.print(f"  rejected: {side['rejected']}\n  chosen:   {side['chosen']}", highlight=False, markup=False)
