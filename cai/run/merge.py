"""Combining output files of one run (shards, or runs on several machines) into one file, each id
once. Torn lines (a killed writer) and foreign lines (not a record, or a record of another run)
are left out with file:line; one id with two different records is a conflict, which stops the
merge unless `on_conflict` says which to keep."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cai.compressed import compression_of, compressor
from cai.errors import CaiError, OptionError

ON_CONFLICT = ("error", "first", "last")


@dataclass
class MergeSummary:
    output: str
    files: int
    kept: int = 0
    duplicate: int = 0       # the same record again (a resumed shard, a file given twice)
    torn: int = 0
    foreign: int = 0
    conflicts: list[str] = field(default_factory=list)     # "id: file:line vs file:line"
    problems: list[str] = field(default_factory=list)      # lines left out, with file:line


class MergeConflict(CaiError):
    """Records with one id and different content: which one is right is the user's call."""

    exit_code = 1

    def __init__(self, message: str, conflicts: list[str]):
        super().__init__(message)
        self.conflicts = conflicts


def _content(record: dict) -> dict:
    """A record without what differs between two writes of the same pair (its creation time)."""
    meta = {k: v for k, v in record.get("meta", {}).items() if k != "created"}
    return {**record, "meta": meta}


def merge(output: str, inputs: list[str], *, overwrite: bool = False, on_conflict: str = "error",
          lock: bool = True) -> MergeSummary:
    from cai.locks import Locks
    from cai.output import check_writable, write_whole
    from cai.pipeline import fingerprint_differences

    if on_conflict not in ON_CONFLICT:
        raise OptionError("on_conflict", f"unknown value '{on_conflict}'; choose from {', '.join(ON_CONFLICT)}")
    if output != "-" and Path(output).exists() and not overwrite:
        raise OptionError("output", f"{output} exists; pass `overwrite` to replace it")
    if output != "-" and any(Path(output).resolve() == Path(path).resolve() for path in inputs):
        raise OptionError("output", f"{output} is also one of the inputs")
    for path in inputs:
        if not Path(path).is_file():
            raise OptionError("inputs", f"{path}: no such file")
    check_writable(output)
    if output != "-" and Path(output).exists() and not Path(output).is_file():
        raise OptionError("output", f"{output} is not a regular file (merge replaces its output whole)")
    summary = MergeSummary(output, len(inputs))
    chosen: dict[str, tuple[str, bytes, dict]] = {}      # id → (where, line, content)
    reference = None
    for path in inputs:
        torn = False
        with _lines(path) as (fp, cut):
            for number, raw in enumerate(fp, start=1):
                where = f"{path}:{number}"
                if not raw.strip():
                    continue
                try:
                    if not raw.endswith(b"\n"):
                        torn = True
                        raise ValueError("no newline")
                    record = json.loads(raw)
                except (ValueError, UnicodeDecodeError):
                    summary.torn += 1
                    summary.problems.append(f"{where}: torn or not JSON; left out")
                    continue
                meta = record.get("meta") if isinstance(record, dict) else None
                if not isinstance(meta, dict) or not isinstance(record.get("id"), str) or "chosen" not in record:
                    summary.foreign += 1
                    summary.problems.append(f"{where}: not a cai record; left out")
                    continue
                reference = reference or record
                differences = fingerprint_differences(reference, {
                    **{k: meta.get(k) for k in ("model", "constitution", "templates", "seed")},
                    "params": meta.get("params") if isinstance(meta.get("params"), dict) else {}})
                if differences:
                    summary.foreign += 1
                    summary.problems.append(f"{where}: a record of a different run ({'; '.join(differences)}); left out")
                    continue
                content = _content(record)
                if record["id"] not in chosen:
                    chosen[record["id"]] = (where, raw, content)
                elif chosen[record["id"]][2] == content:
                    summary.duplicate += 1
                else:
                    summary.conflicts.append(f"{record['id']}: {chosen[record['id']][0]} and {where} differ")
                    if on_conflict == "last":
                        chosen[record["id"]] = (where, raw, content)
        if cut and not torn:              # cut off between two lines: no torn line says so
            summary.torn += 1
            summary.problems.append(f"{path}: stops inside its last compressed member (a writer stopped "
                                    "mid-batch); read up to there")
    if summary.conflicts and on_conflict == "error":
        shown = "; ".join(summary.conflicts[:3]) + (f"; and {len(summary.conflicts) - 3} more" if len(summary.conflicts) > 3 else "")
        raise MergeConflict(f"{len(summary.conflicts)} ids have two different records ({shown}); nothing written. "
                            "Say which to keep: --on-conflict first|last (on_conflict= in Python)", summary.conflicts)
    summary.kept = len(chosen)
    data = b"".join(raw for _, raw, _ in chosen.values())
    if output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return summary
    kind = compression_of(output) if output != "-" else None
    with Locks([output], enabled=lock):
        write_whole(output, compressor(kind, output)(data) if kind else data)
    return summary


@contextmanager
def _lines(path: str):
    """(the lines of an input, decompressed where its name or first bytes say so; a list that
    holds True once the data stopped inside its last compressed member: a writer killed
    mid-batch, read up to there)."""
    from cai.compressed import open_stream

    cut: list[bool] = []
    with open(path, "rb") as fp:
        stream, _ = open_stream(fp, path, kind=compression_of(path), on_cut=lambda: cut.append(True))
        yield stream, cut
