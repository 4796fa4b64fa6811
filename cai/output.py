"""Writing records: one whole line per write, fsynced at batch boundaries, appended on resume; and
reading back what an existing output holds. An output named .gz, .bz2, .xz or .zst is written
compressed: each batch one whole member (see cai.compressed), so what a resume keeps is the whole
members, as it keeps the whole lines of a plain file."""

from __future__ import annotations

import errno
import json
import os
import sys
from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path

from cai.compressed import CUT, compression_of, compressor, members
from cai.errors import InputError, OutputError

SIDE_FILES = {"filtered": ".filtered.jsonl", "failures": ".failures.jsonl", "skipped": ".skipped.jsonl"}
# the fields every line of a side file has (cai.curation, run.generate._Failures, _skip_invalid)
SIDE_FIELDS = {"filtered": ("meta", "filter"), "failures": ("stage", "error"), "skipped": ("kind", "reason")}
# the reviewer's decisions about a pairs file (`cai review`): PAIRS.review.jsonl, under PAIRS's lock
REVIEW_SUFFIX = ".review.jsonl"
RUNS_FILE = ".runs.jsonl"       # the manifest beside an output: a line when each run starts and ends


def side_path(output: str | None, kind: str) -> str | None:
    """The default side file of `kind` beside `output` (OUT.filtered.jsonl, …); none for stdout or
    a run in memory."""
    return f"{output}{SIDE_FILES[kind]}" if output not in (None, "-") else None


def runs_path(output: str | None) -> str | None:
    """The manifest of `output` (OUT.runs.jsonl); none for stdout or a run in memory."""
    return f"{output}{RUNS_FILE}" if output not in (None, "-") else None


def note_run(output: str | None, line: dict) -> None:
    """Append `line` to the manifest beside `output` (synced): what a run planned when it
    started, and how it ended. A manifest that cannot be written is a warning: the records are
    what counts, and `cai merge` then takes the shard for unfinished."""
    import logging

    path = runs_path(output)
    if path is None:
        return
    existed = os.path.lexists(path)
    data = (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")
    try:
        with open(path, "ab") as fp:
            at = fp.tell()
            try:
                fp.write(data)
                fp.flush()
                os.fsync(fp.fileno())
            except OSError:
                fp.truncate(at)          # never half a line
                raise
    except OSError as exc:
        if not existed:
            Path(path).unlink(missing_ok=True)      # a full disk: no empty manifest left behind
        logging.getLogger("cai").warning("%s: cannot write the run's manifest: %s", path, exc.strerror or exc)


def read_runs(output: str) -> list[dict]:
    """The manifest's lines beside `output` (none if there is none); a torn last line is left out."""
    path = runs_path(output)
    lines = []
    try:
        with open(path, "rb") as fp:
            for raw in fp:
                try:
                    line = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(line, dict):
                    lines.append(line)
    except OSError:
        return []
    return lines


def write_whole(target: str, data: bytes) -> None:
    """Replace `target` (through a symlink, not over it) with `data` at once: written to a
    temporary file beside it, fsynced, renamed. A failure leaves the old file as it was."""
    real = os.path.realpath(target)
    tmp = f"{real}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as fp:
            fp.write(data)
            fp.flush()
            os.fsync(fp.fileno())
        os.replace(tmp, real)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(target, f"cannot write: {exc.strerror or exc}; the file is as it was") from None


@dataclass
class ExistingOutput:
    """What an output file already holds: the ids written, the first record (to compare run
    configs), and how many bytes are whole records (a torn last line from a killed run is cut
    off when the file is reopened for appending)."""

    ids: set[str]
    first: dict | None
    whole_bytes: int
    torn: bool
    stale: list[tuple[str, int]] = field(default_factory=list)    # (id, line) of records `check` refused


def scan_output(path: Path, check: Callable[[dict], bool] | None = None) -> ExistingOutput:
    """Read an existing output without changing it. A broken line before the end is an error.
    `check(record)` false: the record no longer fits its input (listed in `stale`)."""
    ids: set[str] = set()
    stale: list[tuple[str, int]] = []
    first = None
    offset = 0
    try:
        fp = path.open("rb")
    except OSError as exc:
        raise InputError(path, f"cannot read existing output: {exc.strerror}") from None
    with fp:
        kind = compression_of(str(path))
        if kind:
            return _scan_members(fp, path, kind, check)
        for number, raw in enumerate(fp, start=1):
            try:
                if not raw.endswith(b"\n"):
                    raise ValueError("no newline")
                record = json.loads(raw)
                ids.add(str(record["id"]))
            except (ValueError, KeyError, TypeError):
                # only a last line without its newline is torn (a writer stopped mid-line): a
                # whole line that is not a record is someone else's file, even as the last one
                if raw.endswith(b"\n"):
                    raise InputError(path, "not a whole cai record; cannot resume from this file",
                                     line=number) from None
                return ExistingOutput(ids, first, offset, torn=True, stale=stale)
            if check is not None and not check(record):
                stale.append((str(record["id"]), number))
            first = first or record
            offset += len(raw)
    return ExistingOutput(ids, first, offset, torn=False, stale=stale)


def _scan_members(fp, path: Path, kind: str, check: Callable[[dict], bool] | None = None) -> ExistingOutput:
    """scan_output of a compressed output: the ids of its whole members (each ends on a whole
    line), and their bytes; a member cut off (a writer killed mid-member) and what follows the last
    member that ends on a whole line are the torn end a resume cuts off."""
    ids: set[str] = set()
    first = None
    whole, number, rest = 0, 0, b""
    since: set[str] = set()             # ids read since the last whole member
    since_first = None
    stale: list[tuple[str, int]] = []
    since_stale: list[tuple[str, int]] = []
    stream = members(fp, kind, str(path))
    while True:
        try:
            data, end = next(stream)
        except StopIteration:
            break
        except InputError:              # bad compressed data
            if _zeroed_end(fp, whole, kind, str(path)):
                break
            raise
        if data:
            *lines, rest = (rest + data).split(b"\n")
            for raw in lines:
                number += 1
                try:
                    record = json.loads(raw)
                    since.add(str(record["id"]))
                except (ValueError, KeyError, TypeError):
                    raise InputError(path, "not a whole cai record; cannot resume from this file",
                                     line=number) from None
                if check is not None and not check(record):
                    since_stale.append((str(record["id"]), number))
                since_first = since_first or record
        elif end != CUT and not rest:
            ids |= since
            stale += since_stale
            first = first or since_first
            whole, since, since_first, since_stale = end, set(), None, []
    return ExistingOutput(ids, first, whole, torn=whole < os.fstat(fp.fileno()).st_size, stale=stale)


def _zeroed_end(fp, whole: int, kind: str, name: str) -> bool:
    """Whether what follows the last whole member is the start of a member and then NUL bytes to
    the end: what a crash can leave of a write never synced (the file longer, its blocks zeros)."""
    import io

    fp.seek(whole)
    tail = fp.read(1 << 26)
    start = tail.rstrip(b"\0")
    if len(start) == len(tail) or fp.read(1):
        return False
    try:
        for _ in members(io.BytesIO(start), kind, name):
            pass
    except InputError:
        return False
    return True


def check_side_file(path: str | None, kind: str, overwrite: bool = False) -> ExistingOutput | None:
    """A side file of `kind` (filtered, failures, skipped) named explicitly is continued or
    replaced like an output: an existing one must be a cai side file of that kind (its lines whole
    records, as `scan_output` reads them, with the fields of that kind's lines), unless
    `overwrite`; else OptionError naming `kind`. Returns what it holds (None: nothing to keep)."""
    from cai.errors import OptionError

    if not path or path == "-":
        return None
    if Path(path).is_dir():
        raise OptionError(kind, f"{path} is a directory")
    if overwrite or not Path(path).is_file():
        return None
    problem = None
    try:
        existing = scan_output(Path(path))
    except InputError as exc:
        existing, problem = None, f"line {exc.line} is not a cai record" if exc.line else exc.detail
    if existing is not None and existing.first is None and existing.torn:
        problem = "it holds no whole line"
    elif existing is not None and existing.first is not None:
        missing = [name for name in SIDE_FIELDS[kind] if name not in existing.first]
        problem = f"its first line has no {' or '.join(missing)} field" if missing else None
    if problem:
        raise OptionError(kind, f"{path} exists and is not a cai {kind} file ({problem}); use another file, "
                                "or `overwrite` to replace it")
    return existing


def check_writable(target: str) -> None:
    """Fail now, before a model loads, if `target` cannot be written; create nothing."""
    if target == "-":
        return
    path = Path(os.path.realpath(target))        # a symlink is written through: its target's folder counts
    parent = path.parent
    if path.exists():
        ok, reason = os.access(path, os.W_OK), "Permission denied"
    elif not parent.is_dir():
        ok, reason = False, f"{parent} is not a folder" if parent.exists() else "No such file or directory"
    else:
        ok, reason = os.access(parent, os.W_OK), "Permission denied"
    if not ok:
        raise InputError(target, f"cannot write output: {reason}")
    kind = compression_of(target)
    if kind:
        compressor(kind, target)            # zstd needs a package: say so now


def check_folder(folder: str) -> None:
    """Fail now, before anything is read or written, if `folder` cannot be written into or made
    (with whichever of its parents are missing); create nothing."""
    path = Path(folder)
    there = path
    while not (there.exists() or there.is_symlink()) and there != there.parent:
        there = there.parent            # the nearest part of the path that exists
    if not there.is_dir():
        reason = f"{there} is not a folder"
    elif not os.access(there, os.W_OK | os.X_OK):
        reason = "Permission denied" + (f" (in {there})" if there != path else "")
    else:
        return
    raise InputError(folder, f"cannot write output: {reason}")


class RecordWriter:
    """Appends JSON records to a file (or stdout). Each record is one whole line: written with as
    many `write` calls as the OS needs, and cut back to the last whole line if anything (a full
    disk, a signal) stops it halfway, so a file never holds half a record. `sync` fsyncs at batch
    boundaries; `close` syncs too. A write error becomes an OutputError that says how many
    records are safe and that a rerun continues.

    A file named .gz, .bz2, .xz or .zst is written compressed: the lines of a batch are kept until
    `sync` (or until MEMBER_BYTES of them), which writes them as one whole member, cut back as a
    line is if anything stops it halfway. A file with no record is one empty member, a valid file."""

    MEMBER_BYTES = 1 << 20

    def __init__(self, target: str, append_at: int | None = None):
        """`append_at`: keep that many bytes of an existing file and append after them (resume);
        None starts the file afresh."""
        self.target = target
        self.count = 0
        self.records: list[dict] | None = None
        kind = compression_of(target) if target != "-" else None
        self._compress = compressor(kind, target) if kind else None
        self._pending: list[bytes] = []         # lines of the member to come (compressed files)
        self._pending_bytes = 0
        self._failed = False
        if target == "-":
            self._fp = sys.stdout.buffer
            self._owned, self._created = False, False
            self.offset = 0
        else:
            self._created = not os.path.lexists(target)
            try:
                self._fp = open(target, "ab" if append_at is not None else "wb", buffering=0)
                if append_at is not None and os.fstat(self._fp.fileno()).st_size > append_at:
                    self._fp.truncate(append_at)
                self.offset = append_at or 0
            except OSError as exc:
                raise OutputError(target, f"cannot write output: {exc.strerror}") from None
            self._owned = True
            self.before = self.offset > 0

    def write(self, record: dict) -> None:
        try:
            text = json.dumps(record, ensure_ascii=False, allow_nan=False)
        except ValueError:          # NaN or infinity: not JSON, and other readers refuse the file
            raise OutputError(self.target, f"record {record.get('id')!r} holds NaN or infinity, which JSON cannot "
                              "hold; it was not written (a bug: please report it)") from None
        # a lone surrogate that got past the inputs' and backends' checks is escaped, not fatal
        data = (text + "\n").encode("utf-8", "backslashreplace")
        if not self._owned:
            self._fp.write(data)
            self.count += 1
            return
        if self._compress:
            self._pending.append(data)
            self._pending_bytes += len(data)
            self.count += 1
            if self._pending_bytes >= self.MEMBER_BYTES:
                self._flush_member()
            return
        self._put(data)
        self.count += 1

    def _put(self, data: bytes) -> None:
        """Write `data` whole, or cut the file back to where it was."""
        view = memoryview(data)
        try:
            while view:
                written = self._fp.write(view)
                view = view[written:]
        except BaseException as exc:
            self._cut_back()
            if isinstance(exc, OSError):
                error = self._error(exc)
                self._pending, self._pending_bytes = [], 0      # not written: close() does not try again
                self._failed = True
                self._drop_if_empty()
                raise error from None
            raise                       # a signal: the lines of a member stay, for close() to write
        self.offset += len(data)

    def _flush_member(self) -> None:
        if self._pending:
            self._put(self._compress(b"".join(self._pending)))
            self._pending, self._pending_bytes = [], 0

    def _cut_back(self) -> None:
        try:
            self._fp.truncate(self.offset)
        except OSError:
            pass

    def _drop_if_empty(self) -> None:
        """A file this writer created and could not write a first record to (a disk already
        full) is removed, not left empty beside the error."""
        if self._created and not self.offset:
            self._fp.close()
            Path(self.target).unlink(missing_ok=True)

    def _error(self, exc: OSError) -> OutputError:
        safe = "no records" if not self.offset else f"{self.count - len(self._pending)} records of this run"
        return OutputError(self.target, f"cannot write: {exc.strerror or exc}; {safe} written whole before it"
                           + ("; fix it and run the same command again to continue" if self.count or self.before else ""))

    def sync(self) -> None:
        if self._fp.closed:
            return
        if self._compress:
            self._flush_member()
        try:
            self._fp.flush()
            if self._owned:
                os.fsync(self._fp.fileno())
        except BrokenPipeError:
            raise                       # the reader went away: the CLI stops quietly
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.EROFS, errno.ENOTSUP):   # a device or pipe: nothing to sync
                return
            raise self._error(exc) from None

    def close(self) -> None:
        try:
            if self._compress and not (self._fp.closed or self.offset or self._pending or self._failed):
                self._put(self._compress(b""))      # no record: an empty member, not an empty .gz
            self.sync()
        finally:
            if self._owned and not self._fp.closed:
                self._fp.close()


class MemoryWriter:
    """The RecordWriter of a run without an output file (`cai.generate(prompts)`): records are
    kept in `records`."""

    target = None

    def __init__(self):
        self.records: list[dict] = []
        self.count = 0

    def write(self, record: dict) -> None:
        self.records.append(record)
        self.count += 1

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass


class SideFile:
    """A JSONL file beside the output (dropped pairs, failures, skipped prompts), created at its
    first line. A fresh run removes an old one; a resumed run appends after its `append_at`
    whole bytes. Without a path its lines are kept in `lines` (a run in memory), or (output to
    stdout) only counted, the first few kept in `first` for the messages that name them."""

    FIRST = 5

    def __init__(self, path: str | None, append_at: int | None = None, *, memory: bool = False,
                 kind: str = "filtered"):
        self.path, self.append_at, self.kind = path, append_at, kind
        self.lines: list[dict] | None = [] if memory and not path else None
        self.first: list[dict] = []
        self.count = 0
        self._writer: RecordWriter | None = None
        if path and append_at is None and Path(path).is_file():
            Path(path).unlink()          # it describes an earlier run

    def where(self) -> str:
        """Where its lines are, for messages."""
        if self.path:
            return self.path
        if self.lines is not None:
            return "summary.side"
        return f"listed nowhere: {self.nowhere}"

    @property
    def nowhere(self) -> str:
        """Why a file without a path lists nothing, and what would keep its lines."""
        return f"the output is stdout; a {self.kind} file (--{self.kind} FILE) keeps them"

    def write(self, line: dict) -> None:
        self.count += 1
        if len(self.first) < self.FIRST:
            self.first.append(line)
        if self.lines is not None:
            self.lines.append(line)
        if not self.path:
            return
        if self._writer is None:
            self._writer = RecordWriter(self.path, append_at=self.append_at)
        self._writer.write(line)

    def sync(self) -> None:
        if self._writer is not None:
            self._writer.sync()

    def close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()
