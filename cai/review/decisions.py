"""A reviewer's decisions about a pairs file: PAIRS.review.jsonl, append-only, one line per
decision, each line fsynced as it is made, under PAIRS's one-writer lock (cai.locks). The latest
decision about an id wins, so reopening a review resumes it and a changed mind is one more line.

A line: {"id", "decision", "chosen", "rationale", "reviewer", "time"}; `chosen` is the edited
chosen text of an "edit" decision (null otherwise), `rationale` the reviewer's note or null.

`apply` is what downstream (cai export, cai merge) does with them: accept and skip keep the pair,
reject and tie drop it (a tie teaches a preference trainer nothing), swap exchanges chosen and
rejected, edit replaces the chosen text; every pair a decision touched records it in
`meta.review`."""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from cai.errors import InputError, OutputError
from cai.output import REVIEW_SUFFIX

DECISIONS = ("accept", "reject", "swap", "tie", "skip", "edit")
DROPPING = ("reject", "tie")
FIELDS = ("id", "decision", "chosen", "rationale", "reviewer", "time")
MAX_TEXT = 1 << 20              # characters of an edited chosen text
MAX_NOTE = 10_000               # characters of a rationale
MAX_NAME = 200                  # characters of a reviewer's name or an id


def review_path(pairs: str) -> str:
    """The decisions file of a pairs file: PAIRS.review.jsonl."""
    return f"{pairs}{REVIEW_SUFFIX}"


def problem(entry) -> str | None:
    """Why `entry` is not a decision line (or a decision the page sent, before its reviewer and
    time are added), or None when it is one."""
    if not isinstance(entry, dict):
        return "not a JSON object"
    extra = set(entry) - set(FIELDS)
    if extra:
        return f"unknown field {sorted(extra)[0]!r}"
    if not isinstance(entry.get("id"), str) or not entry["id"] or len(entry["id"]) > MAX_NAME:
        return "id: missing or not a string"
    if entry.get("decision") not in DECISIONS:
        return f"decision: must be one of {', '.join(DECISIONS)}"
    chosen = entry.get("chosen")
    if entry["decision"] == "edit":
        if not isinstance(chosen, str) or not chosen.strip():
            return "chosen: an edit needs the edited chosen text"
        if len(chosen) > MAX_TEXT:
            return f"chosen: longer than {MAX_TEXT:,} characters"
    elif chosen is not None:
        return "chosen: only an edit carries a chosen text"
    rationale = entry.get("rationale")
    if rationale is not None and (not isinstance(rationale, str) or len(rationale) > MAX_NOTE):
        return f"rationale: must be a string of at most {MAX_NOTE:,} characters"
    for name in ("reviewer", "time"):
        value = entry.get(name)
        if value is not None and (not isinstance(value, str) or len(value) > MAX_NAME):
            return f"{name}: must be a short string"
    if any("\x00" in value for value in entry.values() if isinstance(value, str)):
        return "contains a NUL character"
    return None


def decision(entry: dict, reviewer: str | None) -> dict:
    """The line to write for a decision the page sent (checked with `problem` first)."""
    rationale = (entry.get("rationale") or "").strip() or None
    return {"id": entry["id"], "decision": entry["decision"],
            "chosen": entry.get("chosen") if entry["decision"] == "edit" else None,
            "rationale": rationale, "reviewer": reviewer,
            "time": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")}


def load(path: str, warn=None) -> dict[str, dict]:
    """The latest decision per id of a decisions file (a torn last line, from a server killed
    mid-write, is skipped with a warning); any other bad line is an InputError with file:line."""
    from cai.inputs import iter_jsonl

    latest: dict[str, dict] = {}
    for name, number, entry in iter_jsonl(path, warn=warn):
        why = problem(entry)
        if why:
            raise InputError(name, f"not a cai review decision ({why})", line=number)
        latest[entry["id"]] = entry
    return latest


class ReviewLog:
    """The decisions file, open for appending for a review's whole life: `open` takes PAIRS's
    lock (held until `close`), reads the decisions already made, and cuts off a torn last line
    (a server killed mid-write) so the next line starts whole; `append` writes one line and
    fsyncs it before it returns."""

    def __init__(self, pairs: str, lock: bool = True):
        self.pairs = pairs
        self.path = review_path(pairs)
        self.lock = lock
        self.latest: dict[str, dict] = {}
        self.lines = 0
        self.torn = False
        self._locks = None
        self._writer = None
        self._mutex = threading.Lock()

    def open(self) -> ReviewLog:
        from cai.locks import Locks
        from cai.output import RecordWriter, check_writable

        check_writable(self.path)
        self._locks = Locks([self.path], enabled=self.lock).__enter__()
        try:
            whole = self._read()
            self._writer = RecordWriter(self.path, append_at=whole) if os.path.exists(self.path) else None
        except BaseException:
            self.close()
            raise
        return self

    def _read(self) -> int:
        """Read the decisions made; the number of bytes that are whole lines."""
        path = Path(self.path)
        if not path.exists():
            return 0
        whole = 0
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InputError(self.path, f"cannot read: {exc.strerror}") from None
        for number, raw in enumerate(data.splitlines(keepends=True), start=1):
            if not raw.endswith(b"\n"):
                self.torn = True            # the line in flight when a server was killed
                break
            if raw.strip():
                try:
                    entry = json.loads(raw)
                except ValueError:
                    entry = None
                why = problem(entry) if entry is not None else "not JSON"
                if why:
                    raise InputError(self.path, f"not a cai review decision ({why}); cannot continue this review",
                                     line=number)
                self.latest[entry["id"]] = entry
                self.lines += 1
            whole += len(raw)
        return whole

    def append(self, line: dict) -> dict:
        from cai.output import RecordWriter

        with self._mutex:
            if self._writer is None:
                self._writer = RecordWriter(self.path, append_at=0)
            try:
                self._writer.write(line)
                self._writer.sync()
            except OutputError:
                raise
            self.latest[line["id"]] = line
            self.lines += 1
        return line

    def close(self) -> None:
        with self._mutex:
            if self._writer is not None:
                writer, self._writer = self._writer, None
                try:
                    writer.close()
                except OutputError:
                    pass
            if self._locks is not None:
                locks, self._locks = self._locks, None
                locks.__exit__(None, None, None)

    def __enter__(self) -> ReviewLog:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()


# --- downstream ---------------------------------------------------------------------------------

@dataclass
class Applied:
    """What the decisions did to a file's records."""

    source: str | None = None                                   # the decisions file read
    counts: Counter = field(default_factory=Counter)            # decision → pairs it touched
    dropped: int = 0                                            # rejected and tied pairs left out
    elsewhere: int = 0                                          # decisions about ids not in the records

    def line(self) -> str:
        """'review (FILE): 2 rejected and 1 tie dropped, 1 swapped, 1 edited, 3 accepted'."""
        c = self.counts
        parts = [f"{c['reject']} rejected and {c['tie']} tied dropped", f"{c['swap']} swapped",
                 f"{c['edit']} edited", f"{c['accept']} accepted", f"{c['skip']} skipped"]
        if self.elsewhere:
            parts.append(f"{self.elsewhere} decisions about pairs not in the file (dropped ones) not used")
        return f"review ({self.source}): " + ", ".join(parts)

    def to_dict(self) -> dict:
        return {"file": self.source, **{d: self.counts[d] for d in DECISIONS}, "dropped": self.dropped,
                "not_in_file": self.elsewhere}


def reviewed(record: dict, entry: dict) -> dict | None:
    """The record as the decision `entry` leaves it, or None when it drops it."""
    from cai.edits import edit_size
    from cai.messages import text_of

    kind = entry["decision"]
    if kind in DROPPING:
        return None
    meta = dict(record.get("meta") or {})
    review = {"decision": kind, "reviewer": entry.get("reviewer"), "time": entry.get("time"),
              "rationale": entry.get("rationale")}
    record = dict(record)
    if kind == "swap":
        record["chosen"], record["rejected"] = record["rejected"], record["chosen"]
        judge = record.get("judge")
        if isinstance(judge, dict):
            # the judge's label is the chosen side's: it now describes the other side
            label = judge.get("label")
            record["judge"] = {**judge, "swapped": not judge.get("swapped", False),
                               **({"label": round(1 - label, 6)} if isinstance(label, (int, float)) else {})}
    elif kind == "edit":
        before = record["chosen"]
        review["chosen_before"] = text_of(before)
        record["chosen"] = ([{"role": "assistant", "content": entry["chosen"]}] if isinstance(before, list)
                            else entry["chosen"])
        if "judge" in record:           # it judged the text before the edit
            review["judge"] = record.pop("judge")
        try:
            meta["edit"] = edit_size(text_of(record["rejected"]), entry["chosen"])
        except (ValueError, TypeError):
            pass
    meta["review"] = review
    record["meta"] = meta
    return record


def apply(records: list[dict], decisions: dict[str, dict], source: str | None = None) -> tuple[list[dict], Applied]:
    """The records with the decisions applied (see the module's docstring), and the counts."""
    applied = Applied(source)
    out = []
    ids = set()
    for record in records:
        ids.add(record.get("id"))
        entry = decisions.get(record.get("id"))
        if entry is None:
            out.append(record)
            continue
        applied.counts[entry["decision"]] += 1
        changed = reviewed(record, entry)
        if changed is None:
            applied.dropped += 1
        else:
            out.append(changed)
    applied.elsewhere = sum(1 for key in decisions if key not in ids)
    return out, applied


def decisions_for(pairs: str, review: str | bool | None = None, warn=None) -> tuple[dict[str, dict], str | None]:
    """(the latest decisions, the file they came from) for a pairs file: `review` a path names the
    decisions file (it must exist), None means PAIRS.review.jsonl when it exists, False none."""
    if review is False or (review is None and pairs == "-"):
        return {}, None
    path = review if isinstance(review, str) else review_path(pairs)
    if not Path(path).is_file():
        if isinstance(review, str):
            raise InputError(path, "no such file (the review's decisions)")
        return {}, None
    return load(path, warn=warn), path
