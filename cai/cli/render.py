"""Everything the CLI shows a person, on stderr: log lines, the loading spinner and progress bar,
and the summary tables of each command. stdout is never touched here."""

import logging
import re
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from cai.errors import OPTION_NAME

err = Console(stderr=True)


def current_context():
    """The click context of the command running now, or None (typer from 0.2x runs its own copy
    of click, whose contexts click's get_current_context does not see)."""
    try:
        from typer._click.globals import get_current_context
    except ImportError:
        from click import get_current_context
    return get_current_context(silent=True)


def as_flags(text: str) -> str:
    """A library message as the command line shows it: each option it names in backquotes
    (cai.errors.OPTION_NAME) becomes the running command's flag (`prompt_field` → --prompt-field,
    `few_shot=False` → --no-few-shot); backquoted words that are none of its options (a model's
    name in a server's message) stay as they are."""
    ctx = current_context()
    if ctx is None:
        return text
    flags = {flag for p in ctx.command.params for flag in (*p.opts, *p.secondary_opts) if flag.startswith("--")}
    names = {p.name: next((f for f in p.opts if f.startswith("--")), None) for p in ctx.command.params}

    def flag(m: re.Match) -> str:
        kebab = "--" + ("no-" if m[2] else "") + m[1].replace("_", "-")
        if kebab in flags:
            return kebab
        return (None if m[2] else names.get(m[1])) or m[0]
    return OPTION_NAME.sub(flag, text)


class _StderrHandler(logging.Handler):
    """Log lines on stderr, one line each however long (greppable, never wrapped mid-path); the
    options they name are shown as flags."""

    STYLES = {"WARNING": "yellow", "ERROR": "red", "INFO": "dim"}

    def emit(self, record: logging.LogRecord) -> None:
        line = Text(f"{record.levelname.lower()}: ", style=self.STYLES.get(record.levelname, ""))
        line.append(as_flags(record.getMessage()))
        err.print(line, soft_wrap=True, highlight=False)


def setup_logging(quiet: bool) -> None:
    logger = logging.getLogger("cai")
    logger.handlers[:] = [_StderrHandler()]
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def summary_table(title: str) -> Table:
    """A two-column (name, value) table for a command's summary on stderr."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    return table


class RunProgress:
    """The progress callback of a generation run: a spinner while the model loads, then a bar of
    records with pairs/min and tok/s. Use as a context manager around the run."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self._status = None
        self._bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TextColumn("[dim]ETA[/dim]"), TimeRemainingColumn(),
            console=err, disable=quiet, transient=False)
        self._task = None
        self._shown = 0.0

    def __call__(self, phase: str, summary) -> None:
        if self.quiet:
            return
        if phase == "loading":
            self._status = err.status(f"loading {summary.model}…", spinner="dots")
            self._status.start()
        elif phase == "running":
            self._stop_status()
            if summary.width:
                logging.getLogger("cai").info("up to %d conversations in flight (--batch-size)", summary.width)
            self._bar.start()
            todo = summary.planned - summary.resumed - summary.skipped
            self._task = self._bar.add_task("prompts", total=max(todo, 0), rate="")
        elif self._task is not None:
            now = time.monotonic()
            if phase == "turn" and now - self._shown < 0.2:
                return
            self._shown = now
            pairs, tokens = summary.rate
            self._bar.update(self._task, completed=summary.kept + summary.dropped + summary.failed,
                             rate=f"{pairs:.1f} pairs/min · {tokens:.1f} tok/s")

    def _stop_status(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._stop_status()
        if self._task is not None:
            self._bar.stop()


def generate_summary(summary) -> None:
    from cai.run.summary import resolved

    pairs, tokens = summary.rate
    curation = summary.curation
    table = summary_table("cai generate")
    table.add_row("model", summary.model)
    table.add_row("constitution", summary.constitution)
    table.add_row("records planned", str(summary.planned))
    if summary.resumed:
        table.add_row("already there (resumed)", str(summary.resumed))
    table.add_row("pairs made", str(summary.made))
    table.add_row("records written", str(summary.kept)
                  + (f" ({summary.kept - summary.repaired} on the first try, {summary.repaired} after repair)"
                     if summary.repaired else ""))
    if summary.pairs != summary.kept:        # sampled pairs (--samples), earlier rounds (--keep-rounds)
        table.add_row("pairs written in all", str(summary.pairs))
    if curation.get("active") or summary.dropped:
        reasons = " · ".join(f"{reason} {count}" for reason, count in curation["reasons"].items())
        table.add_row("dropped (filters)", f"{summary.dropped}" + (f" ({reasons})" if reasons else ""))
    if summary.failed:
        table.add_row("failed (retry: run again)", f"{summary.failed}" + (f" → {summary.failures}" if summary.failures else ""))
    if summary.skipped_invalid:
        table.add_row("invalid input lines skipped", str(summary.skipped_invalid))
    if summary.skipped_long:
        table.add_row("prompts too long for the context", str(summary.skipped_long))
    if summary.skipped_refused:
        table.add_row("conversations the chat template refuses", str(summary.skipped_refused))
    if summary.not_made:
        table.add_row("not made (stopped)", str(summary.not_made))
    for name, value in judge_rows(curation):
        table.add_row(name, value)
    if len(summary.endpoints) > 1:
        for figures in summary.endpoints:
            table.add_row(f"endpoint {figures['url']}", endpoint_figures(figures))
    table.add_row("chosen ≠ rejected", f"{summary.changed} of {summary.kept}")
    if not curation.get("active"):
        table.add_row("truncated (hit max tokens)", str(summary.truncated))
    table.add_row("generated tokens", f"{summary.tokens:,}")
    table.add_row("time", f"{summary.elapsed:.1f} s")
    table.add_row("speed", f"{pairs:.1f} pairs/min · {summary.kept_rate:.1f} kept/min · {tokens:.1f} tok/s")
    table.add_row("output", resolved(summary.output))
    if summary.dropped and summary.filtered:
        table.add_row("dropped pairs", resolved(summary.filtered))
    if summary.skipped and summary.skipped_file:
        table.add_row("skipped prompts", resolved(summary.skipped_file))
    err.print(table)


def endpoint_figures(figures: dict) -> str:
    """One endpoint's share of a run, in a line: requests, errors, tokens, median latency."""
    median = figures.get("median_latency")
    text = (f"{figures['requests']:,} requests · {figures['errors']:,} errors · {figures['tokens']:,} tokens"
            + (f" · median {median:.2f} s" if median is not None else ""))
    if figures.get("down"):
        text += f" · out: {figures['down']}"
    elif figures.get("taken_out"):
        text += f" · taken out {figures['taken_out']}× (back in)"
    return text


def judge_rows(curation: dict) -> list[tuple[str, str]]:
    if not curation.get("judging"):
        return []
    if curation.get("preference") is None:
        unjudged = curation.get("unjudged")
        return [("judge", "no pair judged" + (f" ({unjudged} could not be)" if unjudged else ""))]
    return [("judge: P(revision better)",
             f"{curation['preference']:.3f} both orders · {curation['preference_revision_as_b']:.3f} revision as (B) only · "
             f"{curation['judged']} judged" + (f", {curation['swapped']} swapped" if curation.get("swap") else "")
             + (f", {curation['unjudged']} not judged" if curation["unjudged"] else "")
             + (f", {curation['disagreeing']} with the two orders disagreeing" if curation.get("disagreeing") else ""))]


def stats_tables(report: dict) -> None:
    def fmt(value) -> str:
        if value is None:
            return "–"
        return f"{value:,}" if isinstance(value, int) else f"{value:,.3f}".rstrip("0").rstrip(".")

    def pct(part: int, whole: int) -> str:
        return f"{part:,} ({part / whole:.1%})" if whole else f"{part:,}"

    source = report["input"]
    kept, total = source["kept"], source["total"]
    table = summary_table("cai stats")
    table.add_row("records", source["records"] if source["records"] != "-" else "stdin")
    table.add_row("dropped records", source["filtered"] or "[dim]no side file: none dropped[/dim]")
    table.add_row("kept", pct(kept, total))
    repairs = report.get("repairs")
    if repairs:
        table.add_row("  kept on the first try", pct(repairs["kept_first_try"], total))
        table.add_row("  kept after repair", pct(repairs["kept_after_repair"], total))
    table.add_row("dropped", pct(source["dropped"], total))
    if repairs and repairs["dropped_after_repair"]:
        table.add_row("  dropped after repairs", pct(repairs["dropped_after_repair"], total))
    if source["failed"]:
        table.add_row("failed", pct(source["failed"], total) + f" ({source['side_files']['failed']})")
    if source["skipped"]:
        kinds = ", ".join(f"{kind} {count}" for kind, count in source["skipped_by_kind"].items())
        table.add_row("skipped", pct(source["skipped"], total) + f" ({kinds}; {source['side_files']['skipped']})")
    table.add_row("total", fmt(total))
    for reason, count in source["dropped_by_reason"].items():
        table.add_row(f"  dropped: {reason}", pct(count, total))
    if source["torn_lines"]:
        table.add_row("torn lines skipped", fmt(source["torn_lines"]))
    table.add_row("cleaned (meta.cleaned)", pct(report["cleaned"], kept))
    runs = report.get("runs")
    if runs and runs.get("shards"):
        shards = runs["shards"]
        table.add_row("shards", f"{len(shards['present'])} of {shards['count']}"
                      + (f" · missing {', '.join(map(str, shards['missing']))}" if shards["missing"] else "")
                      + (f" · unfinished {', '.join(map(str, shards['unfinished']))}" if shards["unfinished"] else ""))
    elif runs:
        table.add_row("last run", ("finished" if runs["finished"] else "[yellow]did not finish[/yellow] (run it again)")
                      + (f" · shard {runs['shard']}" if runs["shard"] else ""))
        if len(runs["endpoints"]) > 1:
            for figures in runs["endpoints"]:
                table.add_row(f"endpoint {figures['url']}", endpoint_figures(figures))
    err.print(table)

    table = Table(title="principles", title_justify="left")
    for column in ("principle", "kept", "dropped", "judge mean"):
        table.add_column(column, justify="left" if column == "principle" else "right")
    for name, row in report["principles"].items():
        table.add_row(name, fmt(row["kept"]), fmt(row["dropped"]), fmt(row["judge_mean"]))
    err.print(table)

    table = Table(title="distributions (words)", title_justify="left")
    table.add_column("")
    for column in ("min", "p10", "p50", "p90", "max", "mean"):
        table.add_column(column, justify="right")
    rows = {**report["lengths"], "word edits": report["edits"]["word_edits"], "similarity": report["edits"]["similarity"],
            "edit distance": report["edits"]["distance"], "edit spans": report["edits"]["spans"]}
    if report["edits"]["distance_dropped"]["mean"] is not None:
        rows["edit distance (dropped)"] = report["edits"]["distance_dropped"]
    for name, dist in rows.items():
        table.add_row(name, *(fmt(dist[k]) for k in ("min", "p10", "p50", "p90", "max", "mean")))
    err.print(table)
    err.print(f"near-identical (similarity ≥ 0.9): {pct(report['edits']['near_identical'], kept)}; "
              f"identical (whitespace aside): {pct(report['edits']['identical'], kept)}", highlight=False, soft_wrap=True)

    judge = report["judge"]
    if judge:
        table = Table(title="judge: P(revision better)", show_header=False, title_justify="left")
        table.add_column(style="bold", no_wrap=True)
        table.add_column()
        table.add_row("judged", pct(judge["judged"], kept))
        table.add_row("mean (both orders)", fmt(judge["mean_preference"]))
        table.add_row("mean, revision shown as B", fmt(judge["mean_revision_as_b"]))
        table.add_row("mean, revision shown as A", fmt(judge["mean_revision_as_a"]))
        table.add_row("preferred (> 0.5)", f"{judge['fraction_preferred']:.1%}")
        if judge.get("agreement") is not None:
            table.add_row("orders agree", f"{judge['agreement']:.1%} ({judge['disagreeing']:,} disagree: a tie for --min-preference)")
        if judge["swapped"]:
            table.add_row("swapped (original kept as chosen)", pct(judge["swapped"], kept))
        counts, edges = judge["histogram"]["counts"], judge["histogram"]["edges"]
        widest = max(counts) or 1
        for low, high, count in zip(edges, edges[1:], counts):
            table.add_row(f"  {low:.1f}–{high:.1f}", f"{'█' * round(20 * count / widest):<20} {count:,}")
        err.print(table)

    feedback = report.get("feedback")
    if feedback:
        table = Table(title="feedback (sampled pairs): P(chosen better)", show_header=False, title_justify="left")
        table.add_column(style="bold", no_wrap=True)
        table.add_column()
        label = feedback["label"]
        table.add_row("pairs", f"{feedback['pairs']:,}")
        table.add_row("label", " · ".join(f"{k} {fmt(label[k])}" for k in ("min", "p50", "mean", "max")))
        if feedback["agreement"] is not None:
            table.add_row("orders agree", f"{feedback['agreement']:.1%}")
        counts, edges = feedback["histogram"]["counts"], feedback["histogram"]["edges"]
        widest = max(counts) or 1
        for low, high, count in zip(edges, edges[1:], counts):
            table.add_row(f"  {low:.1f}–{high:.1f}", f"{'█' * round(20 * count / widest):<20} {count:,}")
        for name, row in feedback["principles"].items():
            table.add_row(f"  {name}", f"asked {row['asked']:,} · chosen wins {row['win_rate']:.1%} · "
                                       f"mean {fmt(row['chosen_mean'])} · orders agree {row['agreement']:.1%}")
        err.print(table)

    review = report.get("review")
    if review:
        table = Table(title=f"review ({review['file']})", show_header=False, title_justify="left")
        table.add_column(style="bold", no_wrap=True)
        table.add_column()
        table.add_row("reviewed", f"{review['reviewed']:,} of {review['of']:,}")
        table.add_row("decisions", " · ".join(f"{d} {n:,}" for d, n in review["decisions"].items() if n) or "none")
        table.add_row("reviewers", " · ".join(f"{r} {n:,}" for r, n in review["reviewers"].items()) or "none")
        if review["judge_compared"]:
            table.add_row("reviewer and judge agree", f"{review['judge_agreement']:.1%} of {review['judge_compared']:,} "
                          "accepted or swapped judged pairs")
        err.print(table)

    finish = report["finish_reasons"]
    table = Table(title="finish reasons", title_justify="left")
    for column in ("reason", "response", "final revision"):
        table.add_column(column, justify="left" if column == "reason" else "right")
    for reason in dict.fromkeys([*finish["response"], *finish["revision"]]):
        table.add_row(reason, pct(finish["response"].get(reason, 0), kept), pct(finish["revision"].get(reason, 0), kept))
    err.print(table)




# --- cai preview ------------------------------------------------------------------------------

DIFF_STYLES = {"equal": "", "delete": "red strike", "insert": "green"}


def turn_panel(turn, live: bool = False):
    """A turn of a preview as a panel: its stage and principle as the title, its text, and (once
    ended) its tokens and times below."""
    from rich.panel import Panel

    title = turn.stage + (f" · {turn.principle}" if turn.principle else "")
    body = Text(turn.text) if turn.text else Text("…", style="dim")
    if live:
        body.append(" ▌", style="dim")
    subtitle = None
    if turn.ended is not None:
        first = "" if turn.first is None else f" · first token {turn.first - turn.started:.2f} s"
        cut = " · [yellow]hit --max-new-tokens[/yellow]" if turn.finish_reason == "length" else ""
        subtitle = f"[dim]{turn.tokens} tokens · {turn.ended - turn.started:.1f} s{first}[/dim]{cut}"
    style = {"response": "cyan", "critique": "magenta", "revision": "green"}[turn.stage.split()[0]]
    return Panel(body, title=f"[bold {style}]{title}[/bold {style}]", title_align="left",
                 subtitle=subtitle, subtitle_align="right", border_style=style)


def preview_outcome(conversation) -> None:
    """The verdict of the filters, the judge's preference and the word diff of a finished
    conversation of `cai preview`."""
    from rich.panel import Panel

    from cai.filters import REASONS

    if conversation.reasons:
        verdict = Text("dropped", style="bold red")
        for reason in conversation.reasons:
            verdict.append(f"\n  {reason}", style="red")
            verdict.append(f": {as_flags(REASONS.get(reason, ''))}", style="dim")
    else:
        verdict = Text("kept", style="bold green")
    verdict.append(f"\n  similarity of chosen to rejected: {conversation.similarity:.2f}", style="dim")
    for note in conversation.cleaned:
        verdict.append(f"\n  cleaned: {note}", style="dim")
    err.print(Panel(verdict, title="[bold]verdict (filters)[/bold]", title_align="left"))
    if conversation.judge:
        judge = conversation.judge
        revision_b, revision_a = judge["orders"]
        line = Text(f"P(revision better) {judge['preference']:.3f}",
                    style="bold green" if judge["preference"] > 0.5 else "bold red")
        line.append(f"  (revision shown as B: {revision_b:.3f} · as A: {revision_a:.3f})\n", style="")
        line.append(judge["question"], style="dim")
        err.print(Panel(line, title="[bold]judge (both orders)[/bold]", title_align="left"))
    elif conversation.judge_error:
        err.print(Panel(Text(conversation.judge_error, style="yellow"), title="[bold]judge[/bold]", title_align="left"))
    diff = Text()
    for op, text in conversation.diff:
        if diff.plain and not diff.plain[-1].isspace() and not text[:1].isspace():
            diff.append(" ")            # a piece that starts the text has no space before it
        diff.append(text, style=DIFF_STYLES[op])
    legend = "[red strike]deleted[/red strike] [green]inserted[/green]"
    err.print(Panel(diff, title="[bold]diff rejected → chosen[/bold]", title_align="left",
                    subtitle=legend, subtitle_align="right"))


def _cell(value, kind: str = "count") -> str:
    """A table cell: a count, a share ("pct") or a figure to 3 decimals ("float")."""
    if value is None:
        return "–"
    if kind == "pct":
        return f"{value:.0%}"
    return f"{value:,}" if kind == "count" else f"{float(value):.3f}"


def reasons_cell(reasons: dict) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in reasons.items()) or "–"


def breakdown_table(section: dict, title: str | None = None) -> None:
    """The rows of `cai stats --by` (or one side of `cai compare`), worst first."""
    table = Table(title=title or f"by {section['key']}" + (f" ({section['constitution']})" if section.get("constitution") else ""),
                  title_justify="left")
    for column in (section["key"], "kept", "dropped", "kept %", "dropped by reason", "edit", "refusals",
                   "judge", "agree"):
        table.add_column(column, justify="left" if column in (section["key"], "dropped by reason") else "right",
                         overflow="fold", no_wrap=column == section["key"])
    for r in section["groups"]:
        table.add_row(r["name"], _cell(r["kept"]), _cell(r["dropped"]), _cell(r["kept_rate"], "pct"),
                      reasons_cell(r["dropped_by_reason"]), _cell(r["edit_distance_mean"], "float"),
                      _cell(r["refusals"]), _cell(r["judge_mean"], "float"), _cell(r["agreement"], "pct"))
    err.print(table)
    if section.get("overlapping"):
        err.print("[dim]a principle with several tags counts under each, so the rows add up to more than the run[/dim]")

