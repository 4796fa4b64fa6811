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
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cai.errors import InputError

KEPT, DROPPED = "kept", "dropped"


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

    @property
    def margin(self) -> float | None:
        """How decided the judge is: 0 a coin toss, 1 certain either way."""
        return None if self.preference is None else round(abs(self.preference - 0.5) * 2, 6)


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _entry(n: int, source: int, offset: int, length: int, record: dict) -> Entry:
    meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
    filt = record.get("filter") if isinstance(record.get("filter"), dict) else None
    judge = record.get("judge") if isinstance(record.get("judge"), dict) else {}
    reasons = filt.get("reasons") if filt else None
    reasons = (reasons,) if isinstance(reasons, str) else tuple(str(r) for r in reasons or ())
    edit = (filt or {}).get("edit") if isinstance((filt or {}).get("edit"), dict) else meta.get("edit")
    agree = judge.get("agree")
    principle = record.get("principle")
    return Entry(n, source, offset, length, str(record["id"]),
                 principle if isinstance(principle, str) and principle else "?",
                 DROPPED if source else KEPT, reasons if source else (),
                 _number(judge.get("preference")), agree if isinstance(agree, bool) else None,
                 _number(edit.get("distance")) if isinstance(edit, dict) else None,
                 all(k in record for k in ("prompt", "chosen", "rejected")),
                 len(meta.get("repairs") or ()) if isinstance(meta.get("repairs"), list) else 0,
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
            raise InputError(filtered, "no such file (--filtered)")
        if not explicit and not Path(self.filtered).is_file():
            self.filtered = None
        self.entries: list[Entry] = []
        self.by_id: dict[str, list[int]] = {}
        self.torn = 0
        self.constitutions: set[str] = set()
        self._files: list = []
        self._maps: list = []

    def build(self) -> PairsIndex:
        try:
            for source, path in enumerate((self.pairs, self.filtered)):
                if path is None:
                    self._files.append(None)
                    self._maps.append(None)
                    continue
                fp = self._open(path)
                self._files.append(fp)
                self._scan(fp, source, path)
                size = os.fstat(fp.fileno()).st_size
                self._maps.append(mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ) if size else None)
        except BaseException:
            self.close()
            raise
        if not any(e.source == 0 for e in self.entries):
            self.close()
            raise InputError(self.pairs, "no records found")
        return self

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
        offset = 0
        loads = json.loads
        for number, raw in enumerate(fp, start=1):
            length = len(raw)
            if raw.strip():
                try:
                    record = loads(raw)
                except ValueError:
                    if not raw.endswith(b"\n"):     # a writer killed mid-line: the torn end
                        self.torn += 1
                        break
                    raise InputError(path, "not a whole JSON record", line=number) from None
                if not isinstance(record, dict) or not isinstance(record.get("id"), (str, int)):
                    raise InputError(path, "not a cai record (no id)", line=number)
                entry = _entry(len(self.entries), source, offset, length, record)
                self.entries.append(entry)
                self.by_id.setdefault(entry.id, []).append(entry.n)
                meta = record.get("meta")
                if isinstance(meta, dict) and isinstance(meta.get("constitution"), str):
                    self.constitutions.add(meta["constitution"])
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
