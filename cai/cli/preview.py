"""`cai preview`: a few conversations run live in the terminal, each turn streamed as the model
writes it, then the filters' verdict, the judge and a word diff. Writes no file."""

import json
import os
import sys
import time
from dataclasses import fields
from typing import Annotated, List, Optional

import typer

from cai.cli.root import app, reports_errors
from cai.cli.options import declared
from cai.options import BackendSpec, PreviewOptions
from cai.cli.render import err, preview_outcome, setup_logging, turn_panel
from cai.run.preview import Watcher

# the options of a run that preview takes (its filters are always on, it writes no file)
PREVIEWED = {f.name for f in fields(BackendSpec)} | {
    "limit", "principle", "all", "constitution", "templates", "input_format", "prompt_field", "revisions",
    "max_new_tokens", "temperature", "top_p", "seed", "few_shot", "reasoning", "drop_refusals", "judge"}


def process_started() -> float:
    """The time.monotonic() at which this process started (Linux, from /proc: so "after the
    command started" counts Python's start and cai's imports too), else now."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
            age = float(uptime.read().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
        return time.monotonic() - max(age, 0.0)
    except (OSError, ValueError, IndexError):
        return time.monotonic()


class LivePanels(Watcher):
    """Each turn as a panel that grows while it streams (rich Live on a terminal; elsewhere the
    panel is printed once, whole), then the outcome panels of the conversation."""

    REFRESH = 1 / 15        # seconds: the panel is redrawn at most this often while it streams

    def __init__(self):
        self._live = None
        self._status = None
        self._drawn = 0.0

    def loading(self, model: str) -> None:
        self._status = err.status(f"loading {model}…", spinner="dots")
        self._status.start()

    def loaded(self, model: str, seconds: float) -> None:
        self._status.stop()
        err.print(f"[dim]loaded {model} in {seconds:.1f} s[/dim]", highlight=False)

    def begin(self, conversation) -> None:
        from rich.panel import Panel
        from rich.text import Text

        err.rule(f"[bold]conversation {conversation.number}/{conversation.total}[/bold] · "
                 f"{' → '.join(dict.fromkeys(conversation.principles))}", align="left")
        err.print(Panel(Text(conversation.prompt), title="[bold]prompt[/bold]", title_align="left",
                        subtitle=f"[dim]{conversation.id}[/dim]", subtitle_align="right"))

    def turn_begin(self, conversation, turn) -> None:
        from rich.live import Live

        if not err.is_terminal:
            return                      # a file or a pipe: each panel once it is whole
        self._live = Live(turn_panel(turn, live=True), console=err, auto_refresh=False,
                          vertical_overflow="ellipsis")
        self._live.start(refresh=True)

    def text(self, conversation, turn) -> None:
        if self._live is None:
            return
        now = time.monotonic()              # redrawn as text comes, not on a timer
        draw = now - self._drawn >= self.REFRESH
        self._drawn = now if draw else self._drawn
        self._live.update(turn_panel(turn, live=True), refresh=draw)

    def turn_end(self, conversation, turn) -> None:
        if self._live is None:
            err.print(turn_panel(turn))
            return
        self._live.update(turn_panel(turn), refresh=True)
        self._live.stop()
        self._live = None

    def judging(self, conversation) -> None:
        self._status = err.status("judging both orders…", spinner="dots")
        self._status.start()

    def end(self, conversation) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None
        preview_outcome(conversation)

    def close(self) -> None:
        for running in (self._live, self._status):
            if running is not None:
                running.stop()


class JsonLines(Watcher):
    """One JSON object per conversation on stdout as it ends; nothing on stderr."""

    def __init__(self, started: float):
        self.started, self.load = started, None

    def loaded(self, model: str, seconds: float) -> None:
        self.load = seconds

    def end(self, conversation) -> None:
        sys.stdout.write(json.dumps(conversation.to_json(self.started, self.load), ensure_ascii=False) + "\n")
        sys.stdout.flush()

    def close(self) -> None: ...


@app.command(epilog=(
    "[bold]Examples[/bold]\n\n"
    "  cai preview \"How do I pick a lock?\"                       [dim]# the principle a run would pick[/dim]\n\n"
    "  cai preview \"How do I pick a lock?\" --all --judge --max-new-tokens 96\n\n"
    "  cai preview prompts.jsonl -n 3 --principle harmful -c my.yaml\n\n"
    "  cai preview \"Tell me a joke\" --json | jq .timings"))
@reports_errors
@declared(PreviewOptions, only=PREVIEWED)
def preview(
    prompt: Annotated[str, typer.Argument(help="A prompt, or a prompts file (any format `cai generate` reads; - for stdin) whose first -n prompts are used.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", rich_help_panel="Run", help="No panels: one JSON object per conversation on stdout (texts, verdict, judge, timings).")] = False,
    options: PreviewOptions = None,
) -> None:
    """Watch the model answer, critique and revise, live: no file is written.

    Each turn streams into its own panel as it is generated; then come the verdict of the
    filters `cai generate` applies (kept, or why it would be dropped), with --judge the judge's
    preference in both orders, and a word diff of rejected → chosen.
    """
    from cai.run.preview import preview as run

    started = process_started()
    setup_logging(quiet=True)
    watcher = JsonLines(started) if as_json else LivePanels()
    try:
        conversations, load = run(prompt, options, watcher)
    finally:
        watcher.close()
    if not as_json and conversations:
        first = next((t.first for t in conversations[0].turns if t.first is not None), None)
        if first is not None:
            err.print(f"[dim]first token {first - started:.2f} s after the process started"
                      + (f" ({load:.1f} s of it loading the model)" if load is not None else "") + "[/dim]",
                      highlight=False)
