"""Combining output files of one run (shards, or runs on several machines) into one file, each id
once, with their side files (the pairs the filters dropped, failures and skipped prompts) combined
beside it, so the accounting of every prompt survives the merge. Torn lines (a killed writer) and
foreign lines (not a record, or a record of another run) are left out with file:line; one id with
two different records is a conflict, which stops the merge unless `on_conflict` says which to
keep; records of two shapes (standard and conversational) are refused."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cai.compressed import compression_of, compressor
from cai.errors import CaiError, InputError, OptionError

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
    side: dict[str, int] = field(default_factory=dict)     # side file kind → lines written beside the output
    shards: ShardSet | None = None                          # the array the inputs are shards of
    review: dict | None = None      # what the inputs' review decisions (INPUT.review.jsonl) did


class MergeIncomplete(CaiError):
    """A set of shards with some missing or unfinished: merging it would lose their prompts
    without a word."""

    exit_code = 1


@dataclass
class ShardSet:
    """What the inputs' manifests say of the array they belong to."""

    count: int                                         # N
    present: dict[int, str] = field(default_factory=dict)      # K → the input holding it
    unfinished: list[int] = field(default_factory=list)
    tasks: dict | None = None                          # the array's scheduler, first task and step

    @property
    def missing(self) -> list[int]:
        return [k for k in range(1, self.count + 1) if k not in self.present]

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unfinished)

    def resubmit(self) -> str:
        """How to run the missing and unfinished shards again: the array's task ids (Slurm's
        --array=, or a Kubernetes job's completion indexes), or the --shard values."""
        shards = sorted({*self.missing, *self.unfinished})
        if self.tasks:
            ids = [self.tasks["min"] + (k - 1) * self.tasks["step"] for k in shards]
            if self.tasks["scheduler"] == "slurm":
                return f"sbatch --array={_ranges(ids)} …"
            return f"the Indexed Job's completion indexes {_ranges(ids)}"
        return ", ".join(f"--shard {k}/{self.count}" for k in shards)

    def problem(self) -> str | None:
        if self.complete:
            return None
        parts = []
        if self.missing:
            parts.append(f"{_listed(self.missing)} of {self.count} {'is' if len(self.missing) == 1 else 'are'} missing")
        if self.unfinished:
            parts.append(f"{_listed(self.unfinished)} did not finish "
                         f"({', '.join(self.present[k] for k in self.unfinished)})")
        return f"{' and '.join(parts)}; run {'it' if len(self.missing) + len(self.unfinished) == 1 else 'them'} " \
               f"again ({self.resubmit()})"

    def as_dict(self) -> dict:
        return {"count": self.count, "present": sorted(self.present), "missing": self.missing,
                "unfinished": self.unfinished, "complete": self.complete}


def _listed(shards: list[int]) -> str:
    return ("shard " if len(shards) == 1 else "shards ") + ", ".join(map(str, shards))


def _ranges(ids: list[int]) -> str:
    """3,4,5,7 → 3-5,7 (Slurm's --array= syntax)."""
    out, start = [], None
    for i, n in enumerate(ids):
        if start is None:
            start = n
        if i + 1 == len(ids) or ids[i + 1] != n + 1:
            out.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ",".join(out)


def shard_set(inputs: list[str]) -> ShardSet | None:
    """The array the inputs are shards of, as their manifests (OUT.runs.jsonl) say; None when
    none of them was written as a shard. Inputs of two arrays of different sizes are an error."""
    from cai.output import read_runs

    found: ShardSet | None = None
    for path in inputs:
        lines = read_runs(path)
        starts = [line for line in lines if line.get("event") == "start" and line.get("shard")]
        if not starts:
            continue
        try:
            k, n = (int(part) for part in str(starts[-1]["shard"]).split("/"))
        except ValueError:
            continue
        if found is None:
            found = ShardSet(n)
        elif found.count != n:
            raise OptionError("inputs", f"{path} is shard {k}/{n}, but {next(iter(found.present.values()))} is of "
                                        f"{found.count} shards; these are not one array")
        if k in found.present and found.present[k] != path:
            raise OptionError("inputs", f"{path} and {found.present[k]} are both shard {k}/{n}")
        found.present[k] = path
        ended = lines[-1].get("event") == "end" and lines[-1].get("finished") is True
        if not ended:
            found.unfinished.append(k)
        task = starts[-1].get("task")
        if found.tasks is None and isinstance(task, dict) and {"scheduler", "min", "step"} <= task.keys():
            found.tasks = {key: task[key] for key in ("scheduler", "min", "step")}
    if found is not None:
        found.unfinished.sort()
    return found


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


def _shape(record: dict) -> str:
    return "conversational" if isinstance(record.get("prompt"), list) else "standard"


def _merge_line(inputs: list[str], summary: MergeSummary) -> dict:
    """The merged output's manifest: what it was made of, and whether the array was whole."""
    from datetime import datetime, timezone

    return {"event": "merge", "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "inputs": inputs, "kept": summary.kept, "side": summary.side,
            "shards": summary.shards.as_dict() if summary.shards else None}


def _lines(path: str, summary: MergeSummary) -> Iterator[tuple[str, bytes, dict]]:
    """(file:line, the line, its object) for each whole JSON object line of `path`, decompressed
    where its name or first bytes say so; torn lines (and data that stops inside its last
    compressed member: a writer killed mid-batch) are counted and left out."""
    from cai.compressed import open_stream

    cut: list[bool] = []
    torn = False
    with open(path, "rb") as fp:
        stream, _ = open_stream(fp, path, kind=compression_of(path), on_cut=lambda: cut.append(True))
        for number, raw in enumerate(stream, start=1):
            where = f"{path}:{number}"
            if not raw.strip():
                continue
            try:
                if not raw.endswith(b"\n"):
                    torn = True
                    raise ValueError("no newline")
                line = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                summary.torn += 1
                summary.problems.append(f"{where}: torn or not JSON; left out")
                continue
            if isinstance(line, dict):
                yield where, raw, line
            else:
                summary.foreign += 1
                summary.problems.append(f"{where}: not a cai record; left out")
    if cut and not torn:              # cut off between two lines: no torn line says so
        summary.torn += 1
        summary.problems.append(f"{path}: stops inside its last compressed member (a writer stopped "
                                "mid-batch); read up to there")


def _apply_reviews(inputs: list[str], chosen: dict[str, tuple[str, bytes, dict]], summary: MergeSummary) -> dict[str, bytes]:
    """Apply each input's review decisions (INPUT.review.jsonl, written by cai review) to the
    records taken from it, in place in `chosen`; the lines of the pairs they drop (rejected,
    tied), for the filtered file with reason `review`."""
    from cai.review.decisions import Applied, decisions_for, reviewed

    found = {}
    for path in inputs:
        decisions, source = decisions_for(path)
        if source is not None:
            found[path] = decisions
    if not found:
        return {}
    applied = Applied(", ".join(f"{p}.review.jsonl" for p in found))
    dropped: dict[str, bytes] = {}
    used = 0
    for key, (where, raw, content) in list(chosen.items()):
        decisions = found.get(where.rsplit(":", 1)[0])
        entry = decisions.get(key) if decisions else None
        if entry is None:
            continue
        used += 1
        applied.counts[entry["decision"]] += 1
        record = json.loads(raw)
        changed = reviewed(record, entry)
        if changed is None:
            applied.dropped += 1
            del chosen[key]
            line = {**record, "filter": {"reasons": ["review"], "review": entry["decision"]}}
            dropped[key] = (json.dumps(line, ensure_ascii=False) + "\n").encode()
        else:
            chosen[key] = (where, (json.dumps(changed, ensure_ascii=False) + "\n").encode(), content)
    applied.elsewhere = sum(len(d) for d in found.values()) - used
    summary.review = applied.to_dict()
    return dropped


def merge(output: str, inputs: list[str], *, overwrite: bool = False, on_conflict: str = "error",
          lock: bool = True, allow_partial: bool = False) -> MergeSummary:
    """Merge `inputs` into `output`. Shards whose manifests say they belong to one array must be
    all there and finished (MergeIncomplete naming the others and how to run them again) unless
    `allow_partial`; the merged output's manifest records what it holds."""
    from cai.locks import Locks
    from cai.output import SIDE_FILES, check_writable, runs_path, side_path, write_whole
    from cai.fingerprint import fingerprint_differences

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
    sides = {kind: [p for path in inputs if Path(p := side_path(path, kind)).is_file()] for kind in SIDE_FILES}
    if output != "-" and not overwrite:
        for beside in (*(side_path(output, kind) for kind in SIDE_FILES), runs_path(output)):
            if Path(beside).exists():
                raise OptionError("output", f"{beside} exists; pass `overwrite` to replace it")
    summary = MergeSummary(output, len(inputs), shards=shard_set(inputs))
    if summary.shards is not None and not summary.shards.complete and not allow_partial:
        raise MergeIncomplete(f"{summary.shards.problem()}; nothing written (`allow_partial` merges what is there)")
    chosen: dict[str, tuple[str, bytes, dict]] = {}      # id → (where, line, content)
    reference = None
    shape: tuple[str, str] | None = None                 # (the first record's shape, where it is)

    def same_run(where: str, line: dict) -> bool:
        """Whether `line` (a record, or a dropped pair's line with the run's fingerprint) comes
        from the run of the first record; a line of another run is counted and left out."""
        meta = line.get("meta")
        if not isinstance(meta, dict) or not isinstance(line.get("id"), str):
            summary.foreign += 1
            summary.problems.append(f"{where}: not a cai record; left out")
            return False
        differences = fingerprint_differences(reference, {
            **{k: meta.get(k) for k in ("model", "constitution", "templates", "seed")},
            "params": meta.get("params") if isinstance(meta.get("params"), dict) else {}}) if reference else []
        if differences:
            summary.foreign += 1
            summary.problems.append(f"{where}: a record of a different run ({'; '.join(differences)}); left out")
        return not differences

    for path in inputs:
        for where, raw, record in _lines(path, summary):
            if "chosen" not in record:
                summary.foreign += 1
                summary.problems.append(f"{where}: not a cai record; left out")
                continue
            if not same_run(where, record):
                continue
            reference = reference or record
            if shape is None:
                shape = (_shape(record), where)
            elif _shape(record) != shape[0]:
                raise InputError(path, f"a {_shape(record)} record, but {shape[1]} is {shape[0]}; records of two "
                                 "shapes cannot share a file (make them one shape with `cai export --format`); "
                                 "nothing written", line=int(where.rsplit(":", 1)[1]))
            content = _content(record)
            if record["id"] not in chosen:
                chosen[record["id"]] = (where, raw, content)
            elif chosen[record["id"]][2] == content:
                summary.duplicate += 1
            else:
                summary.conflicts.append(f"{record['id']}: {chosen[record['id']][0]} and {where} differ")
                if on_conflict == "last":
                    chosen[record["id"]] = (where, raw, content)
    if summary.conflicts and on_conflict == "error":
        shown = "; ".join(summary.conflicts[:3]) + (f"; and {len(summary.conflicts) - 3} more" if len(summary.conflicts) > 3 else "")
        raise MergeConflict(f"{len(summary.conflicts)} ids have two different records ({shown}); nothing written. "
                            "Say which to keep: `on_conflict` first|last", summary.conflicts)
    review_dropped = _apply_reviews(inputs, chosen, summary)
    # the side files: each prompt stays in one place (a pair kept by one shard and dropped by
    # another is kept; a failure or skip that another shard made good is gone)
    dropped: dict[str, bytes] = {}
    for where, raw, line in (entry for path in sides["filtered"] for entry in _lines(path, summary)):
        if same_run(where, line) and line["id"] not in chosen:
            reference = reference or line
            dropped.setdefault(line["id"], raw)
    for key, raw in review_dropped.items():
        dropped.setdefault(key, raw)
    made = chosen.keys() | dropped.keys()
    others: dict[str, dict[object, bytes]] = {}
    for kind in ("failures", "skipped"):
        lines = others[kind] = {}
        for _, raw, line in (entry for path in sides[kind] for entry in _lines(path, summary)):
            if line.get("id") is None or line["id"] not in made:
                lines.setdefault((line.get("id"), line.get("line"), line.get("kind")) if line.get("id") is None
                                 else line["id"], raw)
        made = made | {key for key in lines if isinstance(key, str)}
    side_data = {"filtered": b"".join(dropped.values()), **{k: b"".join(v.values()) for k, v in others.items()}}
    summary.kept = len(chosen)
    summary.side = {"filtered": len(dropped), **{k: len(v) for k, v in others.items()}}
    data = b"".join(raw for _, raw, _ in chosen.values())
    if output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        if any(sides.values()):
            summary.problems.insert(0, f"the inputs' side files ({', '.join(k for k, v in sides.items() if v)}) are "
                                    "not merged when the output is stdout; merge into a file to keep them")
        summary.side = {}
        return summary
    kind = compression_of(output) if output != "-" else None
    with Locks([output], enabled=lock):
        write_whole(output, compressor(kind, output)(data) if kind else data)
        write_whole(runs_path(output), (json.dumps(_merge_line(inputs, summary), ensure_ascii=False) + "\n").encode())
        for side, lines in side_data.items():
            target = side_path(output, side)
            if lines:
                write_whole(target, lines)
            elif Path(target).is_file():
                Path(target).unlink()               # it described an earlier file of this name
    return summary
