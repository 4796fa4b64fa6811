"""Reading what users bring: prompts (JSONL, plain text, stdin) and cai's own record files, each
problem reported with file:line and field."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from cai.errors import InputError
from cai.messages import PromptItem, prompt_id

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


def read_prompts(source: str, prompt_field: str = "prompt", stdin: IO[bytes] | None = None,
                 invalid: list[InputError] | None = None) -> list[PromptItem]:
    """Every prompt of `source` (a path, or '-' for stdin), validated in full before any model
    work starts, so a bad line 90,000 fails now rather than hours into a run. With an `invalid`
    list, bad lines are collected there and skipped instead of raised."""
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
    def bad(error: InputError) -> None:
        if invalid is None:
            raise error
        invalid.append(error)

    decoded = []
    for number, raw in enumerate(lines, start=1):
        try:
            decoded.append((number, raw.decode("utf-8").rstrip("\r\n")))
        except UnicodeDecodeError:
            bad(InputError(name, "not valid UTF-8 text", line=number))
    if decoded and decoded[0][1].startswith("\ufeff"):
        decoded[0] = (decoded[0][0], decoded[0][1][1:])
    if _is_jsonl(source, decoded):
        items = []
        for number, text in decoded:
            try:
                item = _parse_jsonl_line(name, number, text, prompt_field)
            except InputError as error:
                bad(error)
                continue
            if item:
                items.append(item)
    else:
        items = [PromptItem(prompt_id(text.strip()), text.strip(), n) for n, text in decoded if text.strip()]
    items = _unique(name, items, bad)
    if not items:
        raise InputError(name, "no prompts found" + (f" ({len(invalid)} invalid lines skipped)" if invalid else ""))
    return items


def _is_jsonl(source: str, lines: list[tuple[int, str]]) -> bool:
    if source != "-" and Path(source).suffix.lower() in JSONL_SUFFIXES:
        return True
    if source != "-" and Path(source).suffix.lower() == ".txt":
        return False
    first = next((text for _, text in lines if text.strip()), "")
    return first.lstrip().startswith("{")


def _parse_jsonl_line(name: str, number: int, text: str, prompt_field: str) -> PromptItem | None:
    if not text.strip():
        return None
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
    return PromptItem(str(rid), value.strip(), number)


def _unique(name: str, items: list[PromptItem], bad) -> list[PromptItem]:
    """Ids must be unique: resume and merging rely on them. A repeated prompt text (hashed id)
    gets a suffix (`-2`, `-3`); a repeated explicit id is an error."""
    seen: dict[str, int] = {}
    out = []
    for item in items:
        if item.id in seen:
            if item.id != prompt_id(item.text):
                bad(InputError(name, f"duplicate id '{item.id}' (first on line {seen[item.id]})",
                               line=item.line, field="id"))
                continue
            n = 2
            while f"{item.id}-{n}" in seen:
                n += 1
            item = PromptItem(f"{item.id}-{n}", item.text, item.line)
        seen[item.id] = item.line
        out.append(item)
    return out


def iter_jsonl(source: str, stdin: IO[bytes] | None = None, warn: Callable[[str], None] | None = None,
               allow_torn: bool = True) -> Iterator[tuple[str, int, dict]]:
    """(name, line number, object) for each line of `source` (a path or '-'), read as it goes.

    A last line without its newline that is not JSON (a writer killed mid-line) is reported
    through `warn` and skipped, or with `allow_torn=False` is an error; any other line that is
    not a JSON object is an error naming file:line."""
    name = "<stdin>" if source == "-" else source
    if source == "-":
        fp = stdin or sys.stdin.buffer
    else:
        path = Path(source)
        if path.is_dir():
            raise InputError(source, "is a directory, not a pairs file")
        try:
            fp = path.open("rb")
        except FileNotFoundError:
            raise InputError(source, "no such file") from None
        except OSError as exc:
            raise InputError(source, f"cannot read: {exc.strerror}") from None
    try:
        for number, raw in enumerate(fp, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                if allow_torn and not raw.endswith(b"\n"):      # only the last line can lack its newline
                    if warn:
                        warn(f"{name}:{number}: torn last line (no newline, not JSON); skipped")
                    continue
                raise InputError(name, "not a whole JSON record (a torn line? rerun cai generate to repair it)",
                                 line=number) from None
            if not isinstance(obj, dict):
                raise InputError(name, f"expected a JSON object, got {type(obj).__name__}", line=number)
            yield name, number, obj
    finally:
        if source != "-":
            fp.close()


def read_records(source: str) -> list[dict]:
    """Records of a cai output file (either format), each checked to be a whole pair."""
    records = []
    name = "<stdin>" if source == "-" else source
    for name, number, record in iter_jsonl(source, allow_torn=False):
        for field in ("prompt", "chosen", "rejected"):
            if not isinstance(record.get(field), (str, list)):
                raise InputError(name, "missing or not a string / message list", line=number, field=field)
        records.append(record)
    if not records:
        raise InputError(name, "no records found")
    return records
