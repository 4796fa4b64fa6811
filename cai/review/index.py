"""The review page's index of a pairs file and its file of dropped pairs: one pass over each,
keeping per pair where its line starts and ends and the few figures the page filters and sorts by
(principle, kept or dropped and why, the judge's preference and agreement, edit size). A pair's
text is read back by offset when the page asks for it, so memory holds the index, not the file.

A compressed file (.gz, .bz2, .xz, .zst) is decompressed once into an anonymous temporary file
(gone when the index is closed), which is then read by offset as a plain one is."""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from cai.errors import InputError

KEPT, DROPPED = "kept", "dropped"
FIGURES = ("principle", "reasons", "preference", "agree", "edit", "whole", "repairs", "swapped")
_HEAD = re.compile(rb'\{"id": "([^"\\]{1,200})", ')          # how cai starts every record it writes


@dataclass(slots=True)
class Entry:
    n: int                          # place in the index: the pairs file's lines, then the dropped ones
    source: int                     # 0 the pairs file, 1 the file of dropped pairs
    offset: int
    length: int
    id: str
    principle: str
    status: str                     # kept | dropped
    reasons: tuple[str, ...]        # a dropped pair's filter reasons
    preference: float | None        # judge.preference: P(revision better)
    agree: bool | None              # judge.agree (None: not judged in both orders)
    edit: float | None              # meta.edit.distance (filter.edit for a dropped pair)
    whole: bool                     # the line holds the pair's texts (a dropped pair's line may not)
    repairs: int
    swapped: bool                   # judge.swapped: the original is the chosen side
    line: int = 0                   # its line in its file

    @property
    def margin(self) -> float | None:
        """How decided the judge is: 0 a coin toss, 1 certain either way."""
        return None if self.preference is None else round(abs(self.preference - 0.5) * 2, 6)


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _entry(n: int, source: int, offset: int, length: int, record: dict) -> Entry:
    meta = record.get("meta")
    if meta.__class__ is not dict:
        meta = {}
    judge = record.get("judge")
    if judge.__class__ is not dict:
        judge = {}
    edit = meta.get("edit")
    reasons = ()
    if source:
        filt = record.get("filter")
        if isinstance(filt, dict):
            found = filt.get("reasons")
            reasons = (found,) if isinstance(found, str) else tuple(str(r) for r in found or ())
            if isinstance(filt.get("edit"), dict):
                edit = filt["edit"]
    agree = judge.get("agree")
    principle = record.get("principle")
    repairs = meta.get("repairs")
    return Entry(n, source, offset, length, str(record["id"]),
                 principle if principle.__class__ is str and principle else "?",
                 DROPPED if source else KEPT, reasons,
                 _number(judge.get("preference")) if judge else None, agree if agree.__class__ is bool else None,
                 _number(edit.get("distance")) if edit.__class__ is dict else None,
                 "prompt" in record and "chosen" in record and "rejected" in record,
                 len(repairs) if repairs.__class__ is list else 0,
                 judge.get("swapped") is True)


class PairsIndex:
    """Where each pair of `pairs` (and of its dropped pairs' file, when there is one) is, with
    the figures to filter and sort by. `read(n)` gives a pair's record."""

    def __init__(self, pairs: str, filtered: str | None = None):
        from cai.output import side_path

        self.pairs = pairs
        explicit = filtered is not None
        self.filtered = filtered if explicit else side_path(pairs, "filtered")
        if explicit and not Path(filtered).is_file():
            raise InputError(filtered, "no such file (`filtered`)")
        if not explicit and not Path(self.filtered).is_file():
            self.filtered = None
        self.entries: list[Entry] = []
        self.by_id: dict[str, list[int]] = {}
        self.torn = 0
        self.constitutions: set[str] = set()
        self._files: list = []
        self._maps: list = []
        self._paths: list = []
        self.ready = threading.Event()          # the figures are in (the second pass is over)
        self.error: Exception | None = None     # what stopped the second pass

    def build(self, background: bool = True) -> PairsIndex:
        """The first pass (each line's offset and id: fast) now; the second (each line parsed
        for the figures) in a thread, or now with background=False. `wait()` waits for it."""
        try:
            for source, path in enumerate((self.pairs, self.filtered)):
                if path is None:
                    self._paths.append(None)
                    self._files.append(None)
                    self._maps.append(None)
                    continue
                fp = self._open(path)
                self._files.append(fp)
                self._paths.append(path)
                self._scan(fp, source, path)
                size = os.fstat(fp.fileno()).st_size
                self._maps.append(mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ) if size else None)
        except BaseException:
            self.close()
            raise
        if not any(e.source == 0 for e in self.entries):
            self.close()
            raise InputError(self.pairs, "no records found")
        if background:
            threading.Thread(target=self._figures, name="cai-review-index", daemon=True).start()
        else:
            self._figures()
            self.wait()
        return self

    def wait(self) -> None:
        """Wait for the figures; the error of a line the second pass could not read, if any."""
        self.ready.wait()
        if self.error is not None:
            raise self.error

    def _figures(self) -> None:
        """The second pass: every line parsed, its entry's figures filled in."""
        loads = json.loads
        try:
            for e in self.entries:
                raw = self._maps[e.source][e.offset:e.offset + e.length]
                try:
                    record = loads(raw)
                except ValueError:
                    raise InputError(self._paths[e.source], "not a whole JSON record", line=e.line) from None
                if not isinstance(record, dict):
                    raise InputError(self._paths[e.source], "not a cai record", line=e.line)
                full = _entry(e.n, e.source, e.offset, e.length, record)
                for name in FIGURES:
                    setattr(e, name, getattr(full, name))
                meta = record.get("meta")
                if meta.__class__ is dict and meta.get("constitution").__class__ is str:
                    self.constitutions.add(meta["constitution"])
        except Exception as exc:        # the page says so; nothing else can
            self.error = exc
        finally:
            self.ready.set()

    def _open(self, path: str):
        from cai.compressed import open_stream
        from cai.inputs import _suffixes

        if Path(path).is_dir():
            raise InputError(path, "is a directory, not a pairs file")
        try:
            fp = open(path, "rb")
        except FileNotFoundError:
            raise InputError(path, "no such file") from None
        except OSError as exc:
            raise InputError(path, f"cannot read: {exc.strerror}") from None
        head = fp.read(16)
        fp.seek(0)
        from cai.compressed import sniff_compression

        if not (_suffixes(path)[0] or sniff_compression(head)):
            return fp
        # compressed: decompressed once into an anonymous file, read by offset from there
        with fp:
            stream, _ = open_stream(fp, path, kind=_suffixes(path)[0])
            plain = tempfile.TemporaryFile(prefix="cai-review-")
            while chunk := stream.read(1 << 20):
                plain.write(chunk)
            plain.flush()
            plain.seek(0)
            return plain

    def _scan(self, fp, source: int, path: str) -> None:
        """The first pass: each line's offset, length and id. A line that starts as cai writes
        its records (`{"id": "…", `) gives its id without being parsed; any other is parsed."""
        offset = 0
        entries, by_id = self.entries, self.by_id
        head = _HEAD.match
        status = DROPPED if source else KEPT
        for number, raw in enumerate(fp, start=1):
            length = len(raw)
            if not raw.isspace():
                found = head(raw) if raw.endswith(b"}\n") else None
                if found is not None:
                    pair_id = found[1].decode("utf-8", "replace")
                else:
                    try:
                        record = json.loads(raw)
                    except ValueError:
                        if not raw.endswith(b"\n"):     # a writer killed mid-line: the torn end
                            self.torn += 1
                            break
                        raise InputError(path, "not a whole JSON record", line=number) from None
                    if not isinstance(record, dict) or not isinstance(record.get("id"), (str, int)):
                        raise InputError(path, "not a cai record (no id)", line=number)
                    pair_id = str(record["id"])
                n = len(entries)
                entries.append(Entry(n, source, offset, length, pair_id, "?", status, (), None, None, None, True, 0,
                                     False, number))
                if pair_id in by_id:
                    by_id[pair_id].append(n)
                else:
                    by_id[pair_id] = [n]
            offset += length

    def raw(self, n: int) -> bytes:
        entry = self.entries[n]
        return self._maps[entry.source][entry.offset:entry.offset + entry.length]

    def read(self, n: int) -> dict:
        return json.loads(self.raw(n))

    def close(self) -> None:
        for m in self._maps:
            if m is not None:
                m.close()
        for fp in self._files:
            if fp is not None:
                fp.close()
        self._maps, self._files = [], []

    # --- what the page filters and searches by -----------------------------------------------

    def tags(self) -> dict[str, list[str]]:
        """principle → its tags in the constitution the records name (a single shipped one), or
        {} when there is none to read them from."""
        from cai.constitution import load_constitution, shipped_constitutions

        names = {ref.split("@")[0] for ref in self.constitutions}
        if len(names) != 1 or (name := next(iter(names))) not in shipped_constitutions():
            return {}
        try:
            found = load_constitution(name)
        except Exception:           # a constitution that does not load: no tags, not no page
            return {}
        return {p.id: list(p.tags) for p in found.principles}

    def search(self, query: str, candidates: list[Entry]) -> list[Entry]:
        """The candidates whose prompt, texts, critiques, id or filter reasons hold `query`
        (case aside): the raw lines are searched first, then each hit's texts are checked."""
        needle = query.casefold()
        forms = {json.dumps(query, ensure_ascii=a)[1:-1].lower().encode() for a in (False, True)}
        found = []
        for entry in candidates:
            raw = self.raw(entry.n).lower()
            if not any(form in raw for form in forms):
                continue
            if needle in _searchable(json.loads(self.raw(entry.n))).casefold():
                found.append(entry)
        return found


def _searchable(record: dict) -> str:
    parts = [str(record.get("id")), str(record.get("principle") or "")]
    for key in ("prompt", "chosen", "rejected", "critique"):
        value = record.get(key)
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):
            parts += [str(m.get("content", "")) for m in value if isinstance(m, dict)]
    for turn in record.get("history") or ():
        if isinstance(turn, dict):
            parts.append(str(turn.get("content", "")))
    for round_ in record.get("rounds") or ():
        if isinstance(round_, dict):
            parts += [str(round_.get("critique") or ""), str(round_.get("revision") or "")]
    filt = record.get("filter")
    if isinstance(filt, dict):
        parts += [str(r) for r in filt.get("reasons") or ()]
    return "\n".join(parts)
