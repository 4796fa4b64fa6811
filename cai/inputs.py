"""Reading what users bring: prompts (JSONL, CSV/TSV tables, plain text, stdin, compressed or
not; Parquet, Arrow and `datasets` through cai.columnar) and cai's own record files, each problem
reported with file:line and field. Files are read as they go, a line (or a batch of rows) at a
time, so memory holds the prompts and little more."""

from __future__ import annotations

import csv
import itertools
import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import IO

from cai.compressed import COMPRESSED_SUFFIXES, open_stream
from cai.rows import Fields, item_from_row
from cai.errors import InputError, OptionError
from cai.messages import PromptItem, prompt_id

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t"}
# `input_format`: what a file's suffix would say, for stdin and for files whose name says nothing
FORMAT_SUFFIXES = {"jsonl": ".jsonl", "csv": ".csv", "tsv": ".tsv", "text": ".txt"}
FILE_FORMATS = ("parquet", "arrow")           # read by cai.columnar, from a file only
INPUT_FORMATS = (*FORMAT_SUFFIXES, *FILE_FORMATS)
Entry = PromptItem | InputError


def read_prompts(source: str, prompt_field: str = "prompt", stdin: IO[bytes] | None = None,
                 invalid: list[InputError] | None = None, fields: Fields | None = None,
                 split: str | None = None, input_format: str | None = None) -> list[PromptItem]:
    """Every prompt of `source` (a path, '-' for stdin, or a dataset id), validated in full before
    any model work starts, so a bad line 90,000 fails now rather than hours into a run. With an
    `invalid` list, bad lines are collected there and skipped instead of raised.

    The format is told by the suffix, before any compression suffix (`.gz`, `.bz2`, `.xz`, `.zst`):
    `.jsonl`/`.ndjson`/`.json` one object a line, `.csv`/`.tsv` a table with a header row, `.txt`
    one prompt a line; else (and on stdin) JSONL when the first non-blank line starts with '{',
    else text. Compressed data without a compression suffix (stdin) is recognised by its first
    bytes. `.parquet`, `.arrow`/`.feather`, a folder saved by `datasets` and a Hub dataset id
    (`owner/name`) are read row by row (see cai.columnar); `split` picks a split of those.
    `input_format` (one of INPUT_FORMATS) says the format instead, for stdin or a file whose name
    does not tell it. Plain text has no fields: a `prompt` or `response` field other than the
    default is an OptionError there, not ignored.

    Each prompt's `index` is its place among the prompt lines (table rows) of the whole input,
    invalid ones included and blank ones not, so skipping a line never moves a later prompt's.
    `fields` says where a row keeps its prompt (or conversation), a given response and its id
    (default: `prompt_field`, no response, `id`); see cai.rows."""
    fields = fields or Fields(prompt=prompt_field)
    name = "<stdin>" if source == "-" else source
    items: list[PromptItem] = []
    seen: dict[str, int] = {}           # id → line it was first seen on
    suffix: dict[str, int] = {}         # a repeated prompt's id → the next `-n` to try
    with ExitStack() as stack:
        name, entries = _entries(source, name, fields, stdin, split, stack, input_format)
        try:
            for index, entry in enumerate(entries):
                item = entry
                if isinstance(entry, PromptItem) and item.id in seen and item.id != item.content_id:
                    # Ids must be unique: resume and merging rely on them. A repeated explicit id is
                    # an error; a repeated prompt text (hashed id) gets a suffix (`-2`, `-3`).
                    entry = InputError(name, f"duplicate id '{item.id}' (first on line "
                                       f"{seen[item.id]})", line=item.line, field="id")
                if isinstance(entry, InputError):
                    entry.index = index         # where it would have been, as for a valid line
                    if invalid is None:
                        raise entry
                    invalid.append(entry)
                    continue
                if item.id in seen:
                    # the first free `-n` past those given before: every smaller one is taken
                    n = suffix.get(item.id, 2)
                    while f"{item.id}-{n}" in seen:
                        n += 1
                    suffix[item.id] = n + 1
                    item = replace(item, id=f"{item.id}-{n}")
                seen[item.id] = item.line
                items.append(replace(item, index=index))
        except OSError as exc:
            raise InputError(name, f"cannot read: {exc.strerror or exc}") from None
    if not items:
        raise InputError(name, "no prompts found" + (f" ({len(invalid)} invalid lines skipped)" if invalid else ""))
    return items


def _entries(source: str, name: str, fields: Fields, stdin: IO[bytes] | None, split: str | None,
             stack: ExitStack, input_format: str | None = None) -> tuple[str, Iterator[Entry]]:
    """(the input's name in messages, its entries): opened now, so a missing file fails here,
    and read as they are iterated."""
    if input_format is not None and input_format not in INPUT_FORMATS:
        raise OptionError("input_format", f"unknown value '{input_format}'; choose from {', '.join(INPUT_FORMATS)}")
    if source == "-" and input_format in FILE_FORMATS:
        raise OptionError("input_format", f"{input_format} is read from a file, not from stdin")
    if source != "-":
        from cai import columnar

        path = Path(source)
        if input_format is None:
            kind = columnar.kind_of(source)
        elif path.is_dir():
            raise OptionError("input_format", f"is for a prompts file or stdin; {source} is a folder")
        elif not path.exists():
            raise InputError(source, "no such file")
        else:
            kind = input_format if input_format in FILE_FORMATS else None
        if kind:
            shown, rows = columnar.rows(source, kind, fields, split, stack)
            return shown, _row_entries(shown, rows, fields)
        if path.is_dir():
            raise InputError(source, "is a directory, not a prompts file")
    if split is not None:
        raise OptionError("split", f"is for a Parquet/Arrow file, a `datasets` folder or a dataset id, "
                                   f"not {name}")
    suffix_kind, fmt = None, None
    if source == "-":
        fp = stdin or sys.stdin.buffer
    else:
        try:
            fp = stack.enter_context(Path(source).open("rb"))
        except FileNotFoundError:
            raise InputError(source, "no such file") from None
        except OSError as exc:
            raise InputError(source, f"cannot read: {exc.strerror}") from None
        suffix_kind, fmt = _suffixes(source)
    told = "suffix" if fmt else None
    if input_format is not None:
        fmt, told = FORMAT_SUFFIXES[input_format], "input_format"
    stream, _ = open_stream(fp, name, kind=suffix_kind)
    lines = _physical_lines(bounded_lines(stream, name))
    if fmt in TABLE_SUFFIXES:
        return name, _table_entries(name, lines, fields, TABLE_SUFFIXES[fmt])
    decoded = _decoded(lines)
    jsonl = fmt in JSONL_SUFFIXES
    if fmt is None:
        jsonl, decoded = _sniff_jsonl(decoded)
    refuse = None if jsonl else _fields_on_text(name, fields, told)
    return name, _line_entries(name, decoded, fields, jsonl, refuse)


def _fields_on_text(name: str, fields: Fields, told: str | None) -> OptionError | None:
    """The error of a field option given for plain text (which has no fields), or None. It is
    raised at the first prompt line, so an empty input is still 'no prompts found'."""
    option = "prompt_field" if fields.prompt != "prompt" else "response_field" if fields.response else None
    if option is None:
        return None
    how = {"input_format": "as `input_format` text says", "suffix": "by its suffix",
           None: "its first line does not start with '{'"}[told]
    hint = "" if told == "input_format" else "; if it is JSONL, CSV or TSV, say so with `input_format`"
    return OptionError(option, f"does not apply to {name}: it is read as plain text, one prompt a line, "
                               f"with no fields ({how}){hint}")


def _suffixes(source: str) -> tuple[str | None, str | None]:
    """(compression, format suffix) a file's name gives (the format by the suffix before the
    compression's); a compression it does not give is told by the data's first bytes."""
    path = Path(source)
    suffix = path.suffix.lower()
    kind = COMPRESSED_SUFFIXES.get(suffix)
    if kind:
        suffix = Path(path.stem).suffix.lower()
    known = (*JSONL_SUFFIXES, *TABLE_SUFFIXES, ".txt")
    return kind, suffix if suffix in known else None


MAX_LINE_BYTES = 64 << 20      # far past any model's context; a file with longer lines is not prompts


def bounded_lines(stream: IO[bytes], name: str, limit: int = MAX_LINE_BYTES) -> Iterator[bytes]:
    """The lines of a binary stream with their ends, none longer than `limit` bytes: a longer one
    (a binary file, /dev/zero) is an InputError at once, not all memory spent looking for its end."""
    number = 0
    while line := stream.readline(limit + 1):
        number += 1
        if len(line) > limit:
            raise InputError(name, f"a line longer than {limit >> 20} MiB; is this a text file?", line=number)
        yield line


def _physical_lines(stream: Iterable[bytes]) -> Iterator[bytes]:
    """The lines of a binary stream with their ends, split as bytes.splitlines splits them (a
    lone CR ends a line too)."""
    for line in stream:
        if b"\r" in line:
            yield from line.splitlines(keepends=True)
        else:
            yield line


def _decoded(lines: Iterable[bytes]) -> Iterator[tuple[int, str | None]]:
    """(line number, its text without the line end, or None where it is not UTF-8), a BOM off
    the first line."""
    for number, line in enumerate(lines, start=1):
        try:
            text = line.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            text = None
        if number == 1 and text and text.startswith("\ufeff"):
            text = text[1:]
        yield number, text


def _sniff_jsonl(lines: Iterator[tuple[int, str | None]]) -> tuple[bool, Iterator[tuple[int, str | None]]]:
    """(whether the first non-blank line starts with '{', all the lines still to read)."""
    held = []
    for entry in lines:
        held.append(entry)
        if entry[1] and entry[1].strip():
            return entry[1].lstrip().startswith("{"), itertools.chain(held, lines)
    return False, iter(held)


def _line_entries(name: str, lines: Iterable[tuple[int, str | None]], fields: Fields,
                  jsonl: bool, refuse: OptionError | None = None) -> Iterator[Entry]:
    """A PromptItem or the InputError of each non-blank line, in order; `refuse` is raised at
    the first line that holds anything."""
    for number, text in lines:
        if refuse is not None and (text is None or text.strip()):
            raise refuse
        if text is None:
            yield InputError(name, "not valid UTF-8 text", line=number)
            continue
        if not text.strip():
            continue
        if "\x00" in text:
            yield InputError(name, "contains a NUL byte", line=number)
            continue
        try:
            yield _parse_jsonl_line(name, number, text, fields) if jsonl else \
                PromptItem(prompt_id(text.strip()), text.strip(), number)
        except InputError as error:
            yield error


def _row_entries(name: str, rows: Iterable[tuple[int, dict]], fields: Fields) -> Iterator[Entry]:
    """A PromptItem or the InputError of each row of a Parquet/Arrow file or a dataset."""
    for number, row in rows:
        try:
            yield item_from_row(name, number, row, fields)
        except InputError as error:
            yield error


def _parse_jsonl_line(name: str, number: int, text: str, fields: Fields) -> PromptItem:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(name, f"invalid JSON: {exc.msg} (column {exc.colno})", line=number) from None
    if not isinstance(record, dict):
        raise InputError(name, f"expected a JSON object, got {type(record).__name__}", line=number)
    return item_from_row(name, number, record, fields)


# Table cells are decoded with surrogateescape (so one row with bad bytes is one invalid row, not a
# broken file), and NUL is swapped for a lone surrogate no decoding makes, so the csv module (which
# refused NUL before Python 3.11) never sees one.
_NUL = "\udc00"
_UNDECODABLE = re.compile("[\udc80-\udcff]")


def _table_entries(name: str, lines: Iterable[bytes], fields: Fields,
                   delimiter: str) -> Iterator[PromptItem | InputError]:
    """A PromptItem or the InputError of each non-blank row of a CSV/TSV table, in order: the
    header row names the columns, `prompt_field` picks the prompt's and an `id` column, where
    there is one, gives ids (an empty cell: the text's hash, as for JSONL without one). A row's
    line is the physical line it starts on (a quoted cell may span lines)."""
    prompt_field = fields.prompt
    text_lines = (line.decode("utf-8", "surrogateescape").replace("\x00", _NUL) for line in lines)
    reader = csv.reader(text_lines, delimiter=delimiter, strict=True)
    header: list[str] | None = None
    header_line = 0
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, 1 << 30))      # a prompt may be a long document (the default: 128 KiB)
    try:
        while True:
            number = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                message = "a quoted cell is never closed" if "unexpected end of data" in str(exc) else str(exc)
                raise InputError(name, f"invalid {'CSV' if delimiter == ',' else 'TSV'}: {message}", line=number) from None
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if number == 1 and row[0].startswith("\ufeff"):
                row[0] = row[0][1:]
            if header is None:
                header, header_line = [cell.strip() for cell in row], number
                if any(_NUL in cell or _UNDECODABLE.search(cell) for cell in header):
                    raise InputError(name, "header row is not valid UTF-8 text or contains a NUL byte", line=number)
                if prompt_field.split(".")[0] not in header:
                    raise InputError(name, f"missing (columns present: {', '.join(header)}; choose one with "
                                           f"`prompt_field`)", line=number, field=prompt_field)
                for field in (prompt_field, fields.id, fields.response):
                    if field and header.count(field) > 1:
                        raise InputError(name, "column appears more than once in the header", line=number, field=field)
                continue
            if len(row) > len(header):
                yield InputError(name, f"{len(row)} cells where the header (line {header_line}) has {len(header)} "
                                       "(a cell holding the delimiter must be quoted)", line=number)
                continue
            if any(_UNDECODABLE.search(cell) for cell in row):
                yield InputError(name, "not valid UTF-8 text", line=number)
                continue
            row = [cell.replace(_NUL, "\x00") for cell in row]
            cells = dict(zip(header, row + [""] * (len(header) - len(row))))
            if not cells.get(fields.id, "").strip():
                cells.pop(fields.id, None)      # an empty id cell: the text's hash, as for JSONL without one
            try:
                yield item_from_row(name, number, cells, fields)
            except InputError as error:
                yield error
    finally:
        csv.field_size_limit(limit)


# --- cai's own files ---------------------------------------------------------------------------

def iter_jsonl(source: str, stdin: IO[bytes] | None = None, warn: Callable[[str], None] | None = None,
               allow_torn: bool = True) -> Iterator[tuple[str, int, dict]]:
    """(name, line number, object) for each line of `source` (a path or '-'), read as it goes;
    compressed files (by suffix, or by their first bytes) are read decompressed.

    A last line without its newline that is not JSON (a writer killed mid-line) is reported
    through `warn` and skipped, or with `allow_torn=False` is an error; so is a compressed file
    that stops inside its last member (cai writes one per batch: a writer killed mid-batch); any
    other line that is not a JSON object is an error naming file:line."""
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
    cut: list[bool] = []

    def cut_off() -> None:
        if not allow_torn:
            raise InputError(name, "it stops inside its last compressed member (a writer stopped mid-batch? "
                                   "rerun cai generate to repair it)")
        cut.append(True)

    try:
        lines, _ = open_stream(fp, name, kind=None if source == "-" else _suffixes(source)[0], on_cut=cut_off)
        number, torn = 0, False
        for number, raw in enumerate(bounded_lines(lines, name), start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                if allow_torn and not raw.endswith(b"\n"):      # only the last line can lack its newline
                    torn = True
                    if warn:
                        warn(f"{name}:{number}: torn last line (no newline, not JSON); skipped")
                    continue
                raise InputError(name, "not a whole JSON record (a torn line? rerun cai generate to repair it)",
                                 line=number) from None
            if not isinstance(obj, dict):
                raise InputError(name, f"expected a JSON object, got {type(obj).__name__}", line=number)
            yield name, number, obj
        if cut and not torn and warn:
            warn(f"{name}: stops inside its last compressed member after line {number} (a writer stopped "
                 "mid-batch); read up to there")
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
