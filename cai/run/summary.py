"""What a run did, as data: where every record of the run ended (kept, dropped, failed, skipped,
or not made because the run was stopped), the figures of its speed, and the exit code that
says whether anything was not made."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

SKIP_HINT = "try `few_shot=False` or `truncate_long`"
REFUSED_HINT = "fix their turns' roles and order, or use a model whose template takes them"


@dataclass
class Summary:
    """Counts are in records: one per prompt, or one per prompt and principle with sampling
    'all'. `planned` = `resumed` + `kept` + `dropped` + `failed` + `skipped` + `not_made`."""

    model: str = ""
    constitution: str = ""
    output: str | None = None          # a path, "-" for stdout, None for records kept in memory
    filtered: str | None = None        # side files (None: none, or kept in memory)
    failures: str | None = None
    skipped_file: str | None = None
    source: str = ""                   # the prompts, as named in messages
    planned: int = 0
    resumed: int = 0                   # already in the output or the filtered file
    kept: int = 0
    repaired: int = 0                  # of `kept`: kept after a repair (not on the first try)
    dropped: int = 0                   # by the filters or the judge
    failed: int = 0                    # the backend failed after its retries
    skipped_invalid: int = 0           # invalid input lines (--skip-invalid)
    skipped_long: int = 0              # too long for the model's context
    skipped_refused: int = 0           # conversations the model's chat template refuses
    removed: int = 0                   # records in the output whose prompts are no longer in the input
    made: int = 0                      # pairs the model made this run (kept + dropped)
    pairs: int = 0                     # pairs written: more than `kept` with --samples (kept counts
                                       # prompts) or --keep-rounds (a pair per earlier round)
    tokens: int = 0                    # generated tokens
    changed: int = 0                   # kept pairs whose chosen differs from rejected
    truncated: int = 0                 # kept pairs with a turn that hit max_new_tokens
    width: int | None = None           # conversations in flight
    stopped_by: str | None = None      # SIGINT, SIGTERM, SIGHUP, or "stop" (the caller's predicate)
    stop_exit: int = 130
    nothing_to_do: bool = False        # every record was already there
    curation: dict = field(default_factory=dict)
    records: list[dict] | None = None  # the records, for a run without an output file
    side: dict[str, list[dict]] = field(default_factory=dict)   # side lines kept in memory
    endpoints: list[dict] = field(default_factory=list)          # a remote backend's, each with its figures
    manifest_started: bool = False     # the output's manifest has this run's start line
    start: float = field(default_factory=time.monotonic)
    elapsed: float = 0.0

    @property
    def skipped(self) -> int:
        return self.skipped_invalid + self.skipped_long + self.skipped_refused

    @property
    def not_made(self) -> int:
        """Records left unmade by a stop (a rerun makes them)."""
        return max(0, self.planned - self.resumed - self.kept - self.dropped - self.failed - self.skipped)

    @property
    def unjudged(self) -> int:
        """Pairs a run that judges could not judge (kept unlabelled, or dropped under a minimum
        preference): what was asked for was not made."""
        return self.curation.get("unjudged") or 0

    @property
    def complete(self) -> bool:
        return not (self.failed or self.skipped or self.not_made or self.unjudged)

    @property
    def exit_code(self) -> int:
        if self.stopped_by and self.not_made:
            return self.stop_exit
        return 0 if self.complete else 1

    @property
    def rate(self) -> tuple[float, float]:
        """(pairs made per minute, generated tokens per second) so far."""
        elapsed = max(self.elapsed or time.monotonic() - self.start, 1e-9)
        return self.made / elapsed * 60, self.tokens / elapsed

    @property
    def kept_rate(self) -> float:
        """Kept pairs per minute so far: the throughput of pairs worth training on."""
        elapsed = max(self.elapsed or time.monotonic() - self.start, 1e-9)
        return self.kept / elapsed * 60

    def nothing_made(self) -> bool:
        """Prompts were to be made and none could be (all failed or skipped), without a stop."""
        return (self.planned > self.resumed and not self.made and not self.stopped_by
                and bool(self.failed or self.skipped))

    def problem(self) -> str | None:
        """One line saying what was not made, where it is listed and what to do; None when the run
        is whole. Shown even with --quiet."""
        if self.complete:
            return None
        parts = []
        if self.failed:
            parts.append(f"{self.failed} failed after their retries{_where(self.failures)} (run the same "
                         "command again to retry them)")
        if self.skipped_long:
            parts.append(f"{self.skipped_long} skipped as too long for the model's context{_where(self.skipped_file)} "
                         f"({SKIP_HINT})")
        if self.skipped_refused:
            parts.append(f"{self.skipped_refused} skipped as conversations the model's chat template refuses"
                         f"{_where(self.skipped_file)} ({REFUSED_HINT})")
        if self.skipped_invalid:
            parts.append(f"{self.skipped_invalid} skipped as invalid input lines{_where(self.skipped_file)}")
        if self.unjudged:
            where = (f"dropped{_where(self.filtered)}" if self.curation.get("min_preference") is not None
                     else "kept without a label")
            parts.append(f"{self.unjudged} pairs could not be judged ({self.curation.get('judge_error')}); {where}; "
                         "`cai judge` labels pairs once the judge can score them")
        if self.not_made:
            parts.append(f"{self.not_made} not made because the run was stopped ({self.stopped_by}); "
                         + ("run the same command again to continue" if self.output not in (None, "-")
                            else "nothing resumes a run written to stdout"))
        missing = self.planned - self.resumed - self.kept - self.dropped
        lead = ("no record could be made" if self.nothing_made() else
                f"{missing} of {self.planned - self.resumed} records not made" if missing else "not all was made")
        return f"{lead}: " + "; ".join(parts)

    def as_dict(self) -> dict:
        """The summary for machines (no records)."""
        out = {k: v for k, v in self.__dict__.items() if k not in ("records", "side", "start", "manifest_started")}
        out.update(skipped=self.skipped, not_made=self.not_made, complete=self.complete, exit_code=self.exit_code,
                   kept_per_min=round(self.kept_rate, 3))
        return out


def _where(path: str | None) -> str:
    return f" (listed in {path})" if path else ""


def resolved(path: str | None) -> str:
    """A path as the summary shows it: absolute; stdout as 'stdout'."""
    if path is None:
        return "memory"
    return "stdout" if path == "-" else str(Path(path).resolve())
