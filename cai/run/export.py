"""Converting pairs between shapes (standard, conversational, SFT) and files (JSONL, Parquet),
with an optional train/test split by id."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cai.errors import InputError, OptionError, OutputError


@dataclass
class ExportSummary:
    written: dict[str, int] = field(default_factory=dict)     # target → records
    review: dict | None = None          # what a reviewer's decisions did (cai.review.decisions.Applied.to_dict)


def reviewed_records(pairs: str, review: str | bool | None, warn=None) -> tuple[list[dict], dict | None]:
    """The records of `pairs` with the reviewer's decisions applied (PAIRS.review.jsonl when it
    exists, or the file `review` names; none with review=False), and what they did."""
    from cai.inputs import read_records
    from cai.review.decisions import apply, decisions_for

    records = read_records(pairs)
    decisions, source = decisions_for(pairs, review, warn=warn)
    if source is None:
        return records, None
    records, applied = apply(records, decisions, source)
    return records, applied.to_dict()


def export(pairs: str, output: str = "-", *, format: str = "standard", test_size: float | None = None,
           seed: int = 0, lock: bool = True, review: str | bool | None = None) -> ExportSummary:
    """`pairs` in another shape or file. `review`: the decisions file to apply (default
    PAIRS.review.jsonl when it exists; False: none)."""
    from cai.compressed import compression_of
    from cai.locks import Locks
    from cai.output import RecordWriter, check_writable
    from cai.records import EXPORT_FORMATS, split_by_id, to_format

    if format not in EXPORT_FORMATS:
        raise OptionError("format", f"unknown value '{format}'; choose from {', '.join(EXPORT_FORMATS)}")
    if test_size is not None and not 0 < test_size < 1:
        raise OptionError("test_size", f"must be between 0 and 1 (got {test_size:g})")
    if output != "-" and compression_of(output) and Path(output).with_suffix("").suffix == ".parquet":
        raise OptionError("output", f"{output}: a Parquet file compresses its own columns; name it .parquet")
    if test_size is not None and (output == "-" or (Path(output).exists() and not Path(output).is_file())):
        raise OptionError("test_size", "needs an output file (-o FILE) to name OUT.train and OUT.test after")
    kept, review_counts = reviewed_records(pairs, review)
    records = _shaped(pairs, kept, lambda r: to_format(r, format))
    parts = {output: records} if test_size is None else {
        with_part(output, name): part for name, part in zip(("train", "test"), split_by_id(records, test_size, seed))}
    if test_size is not None:
        for name, part in zip(("train", "test"), parts.values()):
            if not part:                # an empty split is a file no trainer can use
                raise OptionError("test_size", f"leaves no record for the {name} split ({len(records)} records); "
                                  "use " + ("a smaller" if name == "train" else "a larger") + " `test_size`, or none")
    if output != "-" and any(Path(t).exists() and Path(t).resolve() == Path(pairs).resolve() for t in parts):
        raise OptionError("output", f"{output} is also the input")
    for target in parts:
        check_writable(target)
    summary = ExportSummary(review=review_counts)
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
    """OUT.train.jsonl from OUT.jsonl (and OUT.train.jsonl.gz from OUT.jsonl.gz)."""
    from cai.compressed import compression_of

    p = Path(path)
    compressed = p.suffix if compression_of(path) else ""
    p = p.with_suffix("") if compressed else p
    return str(p.with_name(f"{p.stem}.{part}{p.suffix}{compressed}"))


@dataclass
class TrainerExport:
    trainer: str
    folder: str
    files: list[str] = field(default_factory=list)        # written, relative to the folder
    records: dict[str, int] = field(default_factory=dict)  # split → records
    command: str = ""
    pushed: str | None = None
    review: dict | None = None          # what a reviewer's decisions did


def export_for(pairs: str, trainer: str, folder: str, *, test_size: float | None = None, seed: int = 0,
               model: str | None = None, overwrite: bool = False, push_to_hub: str | None = None,
               lock: bool = True, review: str | bool | None = None) -> TrainerExport:
    """Write `pairs` into `folder` in the shape `trainer` reads, the config that points it at
    them, and a dataset card (README.md) that `datasets.load_dataset(folder)` follows; or, for
    `argilla`, an Argilla ranking dataset (cai.review.argilla). The reviewer's decisions
    (`review`, as for `export`) are applied first."""
    from cai import stats
    from cai.locks import Locks
    from cai.output import RecordWriter, check_folder
    from cai.records import split_by_id
    from cai.run.card import card
    from cai.trainers import TRAINERS, configs, layout

    if trainer not in (*TRAINERS, "argilla"):
        raise OptionError("to", f"unknown trainer '{trainer}'; choose from {', '.join(TRAINERS)}, argilla")
    if test_size is not None and not 0 < test_size < 1:
        raise OptionError("test_size", f"must be between 0 and 1 (got {test_size:g})")
    if pairs == "-":
        raise OptionError("to", "needs the pairs as a file (its side files feed the dataset card), not stdin")
    root = Path(folder)
    if root.exists() and not root.is_dir():
        raise OptionError("to", f"{folder} exists and is not a folder")
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise OptionError("to", f"{folder} is not empty; pass `overwrite` to write into it")
    check_folder(folder)
    records, review_counts = reviewed_records(pairs, review)
    if not records:
        raise InputError(pairs, "no record left once the review's rejected and tied pairs are dropped")
    if trainer == "argilla":
        return _argilla(pairs, folder, records, review_counts, lock, push_to_hub, test_size)
    report, _ = stats.collect(pairs)
    model = model or _model_of(records)
    splits = {"train": records} if test_size is None else dict(zip(("train", "test"), split_by_id(records, test_size, seed)))
    if test_size is not None and not splits["test"]:
        raise OptionError("test_size", f"leaves no record for the test split ({len(records)} records)")
    if not splits["train"]:             # a trainer has nothing to train on, and load_dataset fails on it
        raise OptionError("test_size", f"leaves no record for the train split (all {len(records)} records fall in "
                                       "the test split); use a smaller `test_size`, or none for no test split")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(folder, f"cannot write output: {exc.strerror or exc}") from None
    folder = str(root.resolve())
    result = TrainerExport(trainer, folder, records={s: len(part) for s, part in splits.items()}, review=review_counts)
    texts, result.command = configs(trainer, folder, model, list(splits), len(splits["train"]))
    shapes = [(shape, {split: _shaped(pairs, splits[split], shape.shape) for split in shape.files})
              for shape in layout(trainer, list(splits))]      # every row made before any file is written
    with Locks([str(root / "README.md")], enabled=lock):
        for shape, rows in shapes:
            for split, relative in shape.files.items():
                try:
                    (root / relative).parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise OutputError(root / relative, f"cannot write output: {exc.strerror or exc}") from None
                writer = RecordWriter(str(root / relative))
                try:
                    for row in rows[split]:
                        writer.write(row)
                finally:
                    writer.close()
                result.files.append(relative)
        for relative, text in texts.items():
            _write_text(root / relative, text)
            result.files.append(relative)
        card_files = layout(trainer, list(splits))[0].files
        _write_text(root / "README.md", card(report, records, card_files, trainer, result.command,
                                             f"The configs name this folder's files by absolute path ({folder}); "
                                             "after moving the folder, export again or edit them."))
        result.files.append("README.md")
    if push_to_hub:
        result.pushed = _push(folder, push_to_hub)
    return result


def _argilla(pairs: str, folder: str, records: list[dict], review: dict | None, lock: bool,
             push_to_hub: str | None, test_size: float | None) -> TrainerExport:
    from cai.locks import Locks
    from cai.review import argilla

    if push_to_hub or test_size is not None:
        raise OptionError("to", "argilla takes no `push_to_hub` or `test_size` (load the folder with rg.Dataset.from_disk)")
    root = Path(folder)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(folder, f"cannot write output: {exc.strerror or exc}") from None
    root = root.resolve()
    with Locks([str(root / "records.json")], enabled=lock):
        files = argilla.write(root, pairs, records)
    command = f"python -c 'import argilla as rg; rg.Dataset.from_disk(\"{root}\")'   (with ARGILLA_API_URL and ARGILLA_API_KEY set)"
    return TrainerExport("argilla", str(root), files, {"records": len(records)}, command, review=review)


def _model_of(records: list[dict]) -> str:
    from cai.records import base_model

    names = {base_model(str((r.get("meta") or {}).get("model", ""))) for r in records} - {""}
    if len(names) != 1:
        raise OptionError("model", f"the records name {len(names)} models ({', '.join(sorted(names)) or 'none'}); "
                          "say which to train with `model`")
    return names.pop()


def _write_text(path: Path, text: str) -> None:
    from cai.output import write_whole

    write_whole(str(path), text.encode("utf-8"))


def _push(folder: str, repo: str) -> str:
    """Upload the folder as a dataset repository; one line on any failure (offline, no token)."""
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        raise OutputError(repo, "cannot push to the Hub: HF_HUB_OFFLINE is set; the export folder is written")
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo, repo_type="dataset", exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=repo, repo_type="dataset")
    except ImportError:
        raise OutputError(repo, "cannot push to the Hub: pip install huggingface_hub") from None
    except Exception as exc:            # network, auth, permissions: all one line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OutputError(repo, f"cannot push to the Hub: {reason}; the export folder is written") from None
    return f"https://huggingface.co/datasets/{repo}"


def _shaped(pairs: str, records: list[dict], shape) -> list[dict]:
    """Each record in a shape; one that has no such shape (a conversation with earlier turns as a
    string prompt) is an InputError naming the pairs file."""
    try:
        return [shape(record) for record in records]
    except ValueError as exc:
        raise InputError("<stdin>" if pairs == "-" else pairs, str(exc)) from None
