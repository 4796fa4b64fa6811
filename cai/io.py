"""Reading prompts (JSONL, plain text, stdin) and writing records (JSONL, one whole line per
write, flushed as each batch finishes, appended on resume)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable

from cai.errors import InputError

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


@dataclass(frozen=True)
class PromptItem:
    id: str
    text: str
    line: int          # 1-based line in the source, for messages


def prompt_id(text: str) -> str:
    """Stable id of a prompt: the first 16 hex digits of the SHA-256 of its text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def read_prompts(source: str, prompt_field: str = "prompt", stdin: IO[bytes] | None = None) -> list[PromptItem]:
    """Every prompt of `source` (a path, or '-' for stdin), validated in full before any model
    work starts, so a bad line 90,000 fails now rather than hours into a run."""
    name = "<stdin>" if source == "-" else source
    if source == "-":
        lines = (stdin or sys.stdin.buffer).read().splitlines(keepends=True)
    else:
        path = Path(source)
        if path.is_dir():
            raise InputError(source, "is a directory, not a prompts file")
        try:
            lines = path.read_bytes().splitlines(keepends=True)
        except FileNotFoundError:
            raise InputError(source, "no such file") from None
        except OSError as exc:
            raise InputError(source, f"cannot read: {exc.strerror}") from None
    decoded = []
    for number, raw in enumerate(lines, start=1):
        try:
            decoded.append((number, raw.decode("utf-8").rstrip("\r\n")))
        except UnicodeDecodeError:
            raise InputError(name, "not valid UTF-8 text", line=number) from None
    if decoded and decoded[0][1].startswith("\ufeff"):
        decoded[0] = (decoded[0][0], decoded[0][1][1:])
    if _is_jsonl(source, decoded):
        items = list(_from_jsonl(name, decoded, prompt_field))
    else:
        items = [PromptItem(prompt_id(text.strip()), text.strip(), n) for n, text in decoded if text.strip()]
    if not items:
        raise InputError(name, "no prompts found")
    return _unique(name, items)


def _is_jsonl(source: str, lines: list[tuple[int, str]]) -> bool:
    if source != "-" and Path(source).suffix.lower() in JSONL_SUFFIXES:
        return True
    if source != "-" and Path(source).suffix.lower() == ".txt":
        return False
    first = next((text for _, text in lines if text.strip()), "")
    return first.lstrip().startswith("{")


def _from_jsonl(name: str, lines: list[tuple[int, str]], prompt_field: str) -> Iterable[PromptItem]:
    for number, text in lines:
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(name, f"invalid JSON: {exc.msg} (column {exc.colno})", line=number) from None
        if not isinstance(record, dict):
            raise InputError(name, f"expected a JSON object, got {type(record).__name__}", line=number)
        if prompt_field not in record:
            fields = ", ".join(record) or "none"
            raise InputError(name, f"missing (fields present: {fields}; choose one with --prompt-field)",
                             line=number, field=prompt_field)
        value = record[prompt_field]
        if not isinstance(value, str):
            raise InputError(name, f"expected a string, got {type(value).__name__}", line=number, field=prompt_field)
        if not value.strip():
            raise InputError(name, "empty prompt", line=number, field=prompt_field)
        rid = record.get("id")
        if rid is None:
            rid = prompt_id(value.strip())
        elif isinstance(rid, bool) or not isinstance(rid, (str, int)) or not str(rid).strip():
            raise InputError(name, "expected a non-empty string or integer", line=number, field="id")
        yield PromptItem(str(rid), value.strip(), number)


def _unique(name: str, items: list[PromptItem]) -> list[PromptItem]:
    """Ids must be unique: resume and merging rely on them. A repeated prompt text (hashed id)
    gets a suffix (`-2`, `-3`); a repeated explicit id is an error."""
    seen: dict[str, int] = {}
    out = []
    for item in items:
        if item.id in seen:
            if item.id != prompt_id(item.text):
                raise InputError(name, f"duplicate id '{item.id}' (first on line {seen[item.id]})",
                                 line=item.line, field="id")
            n = 2
            while f"{item.id}-{n}" in seen:
                n += 1
            item = PromptItem(f"{item.id}-{n}", item.text, item.line)
        seen[item.id] = item.line
        out.append(item)
    return out


def read_done_ids(path: Path) -> set[str]:
    """Ids already written to an output file. A torn last line (a killed run) is cut off so the
    file ends on a whole record again; a broken line elsewhere is an error."""
    done: set[str] = set()
    with path.open("rb+") as fp:
        offset = 0
        for number, raw in enumerate(fp, start=1):
            try:
                record = json.loads(raw)
                if not raw.endswith(b"\n"):
                    raise ValueError("no newline")
                done.add(str(record["id"]))
            except (ValueError, KeyError, TypeError):
                rest = fp.read()
                if rest.strip():
                    raise InputError(path, "not a whole cai record; cannot resume from this file",
                                     line=number) from None
                fp.truncate(offset)
                break
            offset += len(raw)
    return done


class RecordWriter:
    """Appends JSON records to a file (or stdout). Each record is one `write` of one whole line
    to an unbuffered file, so a killed run leaves at most a torn last line, never interleaved
    halves. (jsonlines' Writer writes the line and its newline in two calls, hence our own.)
    `sync` fsyncs at batch boundaries; `close` syncs too."""

    def __init__(self, target: str, append: bool = False):
        self.target = target
        if target == "-":
            self._fp = sys.stdout.buffer
            self._owned = False
        else:
            try:
                self._fp = open(target, "ab" if append else "wb", buffering=0)
            except OSError as exc:
                raise InputError(target, f"cannot write output: {exc.strerror}") from None
            self._owned = True
        self.count = 0

    def write(self, record: dict) -> None:
        self._fp.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        self.count += 1

    def sync(self) -> None:
        self._fp.flush()
        if self._owned:
            os.fsync(self._fp.fileno())

    def close(self) -> None:
        self.sync()
        if self._owned:
            self._fp.close()
