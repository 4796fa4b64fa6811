"""Converting pairs between shapes (standard, conversational, SFT) and files (JSONL, Parquet),
with an optional train/test split by id."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cai.errors import OptionError, OutputError


@dataclass
class ExportSummary:
    written: dict[str, int] = field(default_factory=dict)     # target → records


def export(pairs: str, output: str = "-", *, format: str = "standard", test_size: float | None = None,
           seed: int = 0, lock: bool = True) -> ExportSummary:
    from cai.inputs import read_records
    from cai.locks import Locks
    from cai.output import RecordWriter, check_writable
    from cai.records import EXPORT_FORMATS, split_by_id, to_format

    if format not in EXPORT_FORMATS:
        raise OptionError("format", f"unknown value '{format}'; choose from {', '.join(EXPORT_FORMATS)}")
    if test_size is not None and not 0 < test_size < 1:
        raise OptionError("test_size", f"must be between 0 and 1 (got {test_size:g})")
    if test_size is not None and (output == "-" or (Path(output).exists() and not Path(output).is_file())):
        raise OptionError("test_size", "needs an output file (-o FILE) to name OUT.train and OUT.test after")
    records = [to_format(r, format) for r in read_records(pairs)]
    parts = {output: records} if test_size is None else {
        with_part(output, name): part for name, part in zip(("train", "test"), split_by_id(records, test_size, seed))}
    if output != "-" and any(Path(t).exists() and Path(t).resolve() == Path(pairs).resolve() for t in parts):
        raise OptionError("output", f"{output} is also the input")
    for target in parts:
        check_writable(target)
    summary = ExportSummary()
    with Locks(list(parts), enabled=lock):
        for target, part in parts.items():
            if target.endswith(".parquet"):
                _parquet(target, part)
            else:
                writer = RecordWriter(target)
                try:
                    for record in part:
                        writer.write(record)
                finally:
                    writer.close()
            summary.written[target] = len(part)
    return summary


def _parquet(target: str, part: list[dict]) -> None:
    try:
        import datasets
    except ImportError:
        raise OptionError("output", "Parquet output needs the datasets package (pip install datasets)") from None
    datasets.disable_progress_bars()
    tmp = f"{target}.tmp-{os.getpid()}"
    try:
        datasets.Dataset.from_list(part).to_parquet(tmp)
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(target, f"cannot write: {exc.strerror or exc}") from None


def with_part(path: str, part: str) -> str:
    p = Path(path)
    return str(p.with_name(f"{p.stem}.{part}{p.suffix}"))
