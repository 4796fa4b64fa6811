"""Reading what users bring: prompts (JSONL, CSV/TSV tables, plain text, stdin), compressed or
not, and cai's own record files, each problem reported with file:line and field."""

from __future__ import annotations

import bz2
import csv
import io
import json
import lzma
import re
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import IO

from cai.errors import InputError
from cai.conversations import Fields, item_from_row
from cai.messages import PromptItem, prompt_id

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t"}
COMPRESSED_SUFFIXES = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd"}


def read_prompts(source: str, prompt_field: str = "prompt", stdin: IO[bytes] | None = None,
                 invalid: list[InputError] | None = None, fields: Fields | None = None) -> list[PromptItem]:
    """Every prompt of `source` (a path, or '-' for stdin), validated in full before any model
    work starts, so a bad line 90,000 fails now rather than hours into a run. With an `invalid`
    list, bad lines are collected there and skipped instead of raised.

    The format is told by the suffix, before any compression suffix (`.gz`, `.bz2`, `.xz`, `.zst`):
    `.jsonl`/`.ndjson`/`.json` one object a line, `.csv`/`.tsv` a table with a header row, `.txt`
    one prompt a line; else (and on stdin) JSONL when the first line starts with '{', else text.
    Compressed data without a compression suffix (stdin) is recognised by its first bytes.

    Each prompt's `index` is its place among the prompt lines (table rows) of the whole input,
    invalid ones included and blank ones not, so skipping a line never moves a later prompt's.
    `fields` says where a row keeps its prompt (or conversation), a given response and its id
    (default: `prompt_field`, no response, `id`); see cai.conversations."""
    fields = fields or Fields(prompt=prompt_field)
    prompt_field = fields.prompt
    name = "<stdin>" if source == "-" else source
    if source == "-":
        raw = (stdin or sys.stdin.buffer).read()
    else:
        path = Path(source)
        if path.is_dir():
            raise InputError(source, "is a directory, not a prompts file")
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise InputError(source, "no such file") from None
        except OSError as exc:
            raise InputError(source, f"cannot read: {exc.strerror}") from None
    kind, fmt = _kinds(source, raw[:16])
    if kind:
        raw = io.BufferedReader(_Decompressing(io.BytesIO(raw), kind, name)).read()
    lines = raw.splitlines(keepends=True)

    def bad(error: InputError) -> None:
        if invalid is None:
            raise error
        invalid.append(error)

    if fmt in TABLE_SUFFIXES:
        entries = _table_entries(name, lines, fields, TABLE_SUFFIXES[fmt])
    else:
        decoded: list[tuple[int, str | None]] = []
        for number, line in enumerate(lines, start=1):
            try:
                decoded.append((number, line.decode("utf-8").rstrip("\r\n")))
            except UnicodeDecodeError:
                decoded.append((number, None))
        if decoded and decoded[0][1] and decoded[0][1].startswith("\ufeff"):
            decoded[0] = (1, decoded[0][1][1:])
        jsonl = fmt in JSONL_SUFFIXES or (fmt is None and _looks_jsonl(decoded))
        entries = _line_entries(name, decoded, fields, jsonl)

    items: list[PromptItem] = []
    seen: dict[str, int] = {}           # id → line it was first seen on
    for index, entry in enumerate(entries):
        item = entry
        if isinstance(entry, PromptItem) and item.id in seen and item.id != item.content_id:
            # Ids must be unique: resume and merging rely on them. A repeated explicit id is an
            # error; a repeated prompt text (hashed id) gets a suffix (`-2`, `-3`).
            entry = InputError(name, f"duplicate id '{item.id}' (first on line {seen[item.id]})",
                               line=item.line, field="id")
        if isinstance(entry, InputError):
            entry.index = index         # where it would have been, as for a valid line
            bad(entry)
            continue
        if item.id in seen:
            n = 2
            while f"{item.id}-{n}" in seen:
                n += 1
            item = replace(item, id=f"{item.id}-{n}")
        seen[item.id] = item.line
        items.append(replace(item, index=index))
    if not items:
        raise InputError(name, "no prompts found" + (f" ({len(invalid)} invalid lines skipped)" if invalid else ""))
    return items


def _kinds(source: str, head: bytes) -> tuple[str | None, str | None]:
    """(compression, format suffix) of an input: both by suffix where there is one (the format by
    the suffix before the compression's), the compression else by the data's first bytes."""
    if source == "-":
        return _sniff_compression(head), None
    path = Path(source)
    suffix = path.suffix.lower()
    kind = COMPRESSED_SUFFIXES.get(suffix)
    if kind:
        suffix = Path(path.stem).suffix.lower()
    else:
        kind = _sniff_compression(head)
    known = (*JSONL_SUFFIXES, *TABLE_SUFFIXES, ".txt")
    return kind, suffix if suffix in known else None


def _looks_jsonl(lines: list[tuple[int, str | None]]) -> bool:
    first = next((text for _, text in lines if text and text.strip()), "")
    return first.lstrip().startswith("{")


def _line_entries(name: str, lines: list[tuple[int, str | None]], fields: Fields,
                  jsonl: bool) -> Iterator[PromptItem | InputError]:
    """A PromptItem or the InputError of each non-blank line, in order."""
    for number, text in lines:
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


def _table_entries(name: str, lines: list[bytes], fields: Fields,
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
                                           f"--prompt-field)", line=number, field=prompt_field)
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


# --- compressed input --------------------------------------------------------------------------

_SIGNATURES = {"gzip": b"\x1f\x8b", "bzip2": b"BZh", "xz": b"\xfd7zXZ\x00", "zstd": b"\x28\xb5\x2f\xfd"}


def _sniff_compression(head: bytes) -> str | None:
    """The compression whose signature `head` starts with (none of them can start UTF-8 text,
    bar bzip2's, which is checked further)."""
    for kind, signature in _SIGNATURES.items():
        if head.startswith(signature):
            if kind == "bzip2" and not (head[3:4].isdigit() and head[4:10] in (b"1AY&SY", b"\x17rE8P\x90")):
                continue
            return kind
    return None


def _decompressor(kind: str, name: str):
    if kind == "gzip":
        return lambda: zlib.decompressobj(16 + zlib.MAX_WBITS)
    if kind == "bzip2":
        return bz2.BZ2Decompressor
    if kind == "xz":
        return lzma.LZMADecompressor
    try:
        import zstandard
    except ImportError:
        try:
            from compression.zstd import ZstdDecompressor       # Python 3.14's standard library
        except ImportError:
            raise InputError(name, "is zstd-compressed: reading it needs the zstandard package "
                                   "(pip install zstandard)") from None
        return ZstdDecompressor
    return zstandard.ZstdDecompressor().decompressobj


class _Decompressing(io.RawIOBase):
    """The decompressed bytes of a compressed stream (gzip, bzip2, xz or zstd; several members or
    frames one after another, as `cat a.gz b.gz` makes), read as they are needed. Bad or cut-off
    data is one InputError, not the codec's exception."""

    CHUNK = 1 << 16

    def __init__(self, fp: IO[bytes], kind: str, name: str):
        super().__init__()
        self._fp, self._kind, self._name = fp, kind, name
        self._new = _decompressor(kind, name)
        self._codec = None
        self._out, self._at = b"", 0
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._at == len(self._out) and not self._done:
            self._out, self._at = self._fill(), 0
        n = min(len(buffer), len(self._out) - self._at)
        buffer[:n] = self._out[self._at:self._at + n]
        self._at += n
        return n

    def _fill(self) -> bytes:
        chunk = self._fp.read(self.CHUNK)
        if not chunk:
            self._done = True
            if self._codec is not None and not self._codec.eof:
                raise self._error("it ends early: cut off?")
            return b""
        if self._codec is None and not chunk.startswith(_SIGNATURES[self._kind][:len(chunk)]):
            raise self._error(f"it does not start with the {self._kind} signature")
        out = []
        try:
            while chunk:
                if self._codec is None or self._codec.eof:
                    self._codec = self._new()
                out.append(self._codec.decompress(chunk))
                chunk = self._codec.unused_data if self._codec.eof else b""
        except InputError:
            raise
        except Exception as exc:        # zlib.error, OSError, lzma.LZMAError, zstandard.ZstdError…
            raise self._error(str(exc) or type(exc).__name__) from None
        return b"".join(out)

    def _error(self, detail: str) -> InputError:
        return InputError(self._name, f"not a valid {self._kind} file ({detail})")


def _peek(fp, n: int) -> bytes:
    if fp.seekable():
        head = fp.read(n)
        fp.seek(-len(head), io.SEEK_CUR)
        return head
    return fp.peek(n)[:n] if hasattr(fp, "peek") else b""


# --- cai's own files ---------------------------------------------------------------------------

def iter_jsonl(source: str, stdin: IO[bytes] | None = None, warn: Callable[[str], None] | None = None,
               allow_torn: bool = True) -> Iterator[tuple[str, int, dict]]:
    """(name, line number, object) for each line of `source` (a path or '-'), read as it goes;
    compressed files (by suffix, or by their first bytes) are read decompressed.

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
        kind, _ = _kinds(source, _peek(fp, 16))
        lines = io.BufferedReader(_Decompressing(fp, kind, name)) if kind else fp
        for number, raw in enumerate(lines, start=1):
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
