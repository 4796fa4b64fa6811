"""Prompt tables in columnar form: Parquet, Arrow IPC (`.arrow`/`.feather`, file or stream format,
as `datasets` writes its cache), a folder saved by `datasets` (`save_to_disk`) and a Hugging Face
Hub dataset id (`owner/name`). Each is read a batch of rows at a time, every row a dict for
cai.rows.item_from_row, numbered from 1 within the file (or the split).

pyarrow and datasets are optional: without them such an input is one InputError saying what to
install. A split is chosen with `split`; a dataset with several splits and no `split` is an error
listing them (a single split is used whatever its name: there is no default `train`)."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlsplit

from cai.compressed import COMPRESSED_SUFFIXES
from cai.rows import CONVERSATION_FIELDS, Fields
from cai.errors import InputError

PARQUET_SUFFIXES = (".parquet", ".pq")
ARROW_SUFFIXES = (".arrow", ".feather", ".ipc")
BATCH = 1024                    # rows made into dicts at a time
# Names that are files even where they look like `owner/name` (a path that is not there).
_FILE_SUFFIXES = (*PARQUET_SUFFIXES, *ARROW_SUFFIXES, *COMPRESSED_SUFFIXES, ".jsonl", ".ndjson", ".json",
                  ".csv", ".tsv", ".txt")
_DATASET_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")

Rows = Iterator[tuple[int, dict]]


def kind_of(source: str) -> str | None:
    """'parquet', 'arrow', 'folder' (saved by `datasets`) or 'hub' (a dataset id), or None for
    an input cai.inputs reads as lines."""
    path = Path(source)
    if path.is_dir():
        saved = ("dataset_dict.json", "state.json", "dataset_info.json")
        return "folder" if any((path / name).is_file() for name in saved) else None
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if path.exists():
        if suffixes and suffixes[-1] in (*PARQUET_SUFFIXES, *ARROW_SUFFIXES):
            return "parquet" if suffixes[-1] in PARQUET_SUFFIXES else "arrow"
        if len(suffixes) == 2 and suffixes[1] in COMPRESSED_SUFFIXES and suffixes[0] in (*PARQUET_SUFFIXES, *ARROW_SUFFIXES):
            raise InputError(source, "a compressed Parquet/Arrow file: decompress it first (both compress "
                                     "their own columns)")
        return None
    if (_DATASET_ID.fullmatch(source) and not path.parent.exists()
            and not (suffixes and suffixes[-1] in _FILE_SUFFIXES)):
        return "hub"
    return None


def rows(source: str, kind: str, fields: Fields, split: str | None, stack: ExitStack) -> tuple[str, Rows]:
    """(the name to show in messages, the numbered rows) of an input `kind_of` named."""
    if kind == "parquet":
        return source, _parquet_rows(source, fields, split, stack)
    if kind == "arrow":
        return source, _arrow_rows(source, fields, split, stack)
    datasets = _datasets(source)
    if kind == "folder":
        try:
            loaded = datasets.load_from_disk(source)
        except Exception as exc:        # a broken or half-written folder
            raise InputError(source, f"not a readable `datasets` folder ({_why(exc)})") from None
    else:
        loaded = _from_hub(datasets, source, split)
    dataset, shown = _pick_split(source, loaded, split)
    _check_columns(shown, dataset.column_names, fields)
    return shown, _dataset_rows(shown, dataset)


# --- Parquet and Arrow files ---------------------------------------------------------------------

def _pyarrow(name: str, what: str):
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise InputError(name, f"reading {what} needs pyarrow (pip install pyarrow)") from None
    return pyarrow


def _parquet_rows(source: str, fields: Fields, split: str | None, stack: ExitStack) -> Rows:
    pa = _pyarrow(source, "Parquet")
    _no_split(source, split, "a Parquet file")
    try:
        table = stack.enter_context(pa.parquet.ParquetFile(source))
        names = table.schema_arrow.names
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise InputError(source, f"not a valid Parquet file ({_why(exc)})") from None
    _check_columns(source, names, fields)
    return _numbered(source, "Parquet", table.iter_batches(batch_size=BATCH), pa)


def _arrow_rows(source: str, fields: Fields, split: str | None, stack: ExitStack) -> Rows:
    pa = _pyarrow(source, "Arrow")
    _no_split(source, split, "an Arrow file")
    try:
        mapped = stack.enter_context(pa.memory_map(source, "r"))
        try:                                        # the IPC file format (random access) …
            reader = pa.ipc.open_file(mapped)
            batches: Iterable = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:                     # … or the stream format (`datasets`' cache files)
            mapped.seek(0)
            reader = batches = pa.ipc.open_stream(mapped)
        names = reader.schema.names
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise InputError(source, f"not a valid Arrow IPC file ({_why(exc)})") from None
    _check_columns(source, names, fields)
    return _numbered(source, "Arrow IPC", batches, pa)


def _numbered(name: str, what: str, batches: Iterable, pa) -> Rows:
    """(row number from 1, row) of each record batch, BATCH rows made into dicts at a time."""
    number = 0
    try:
        for batch in batches:
            for at in range(0, batch.num_rows, BATCH):
                for row in batch.slice(at, BATCH).to_pylist():
                    number += 1
                    yield number, row
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise InputError(name, f"not a valid {what} file ({_why(exc)}{_after(number)})") from None


# --- `datasets` folders and Hub ids --------------------------------------------------------------

def _datasets(name: str):
    try:
        import datasets
    except ImportError:
        raise InputError(name, "reading a `datasets` folder or dataset id needs the datasets package "
                               "(pip install datasets)") from None
    return datasets


def _from_hub(datasets, source: str, split: str | None):
    """The dataset `source` names on the Hub (or in the local cache when offline)."""
    offline = any(os.environ.get(var, "").upper() in ("1", "ON", "YES", "TRUE")
                  for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if not offline and not _hub_reachable():        # the Hub client would retry for a minute or more
        raise InputError(source, f"could not load the dataset {source!r} (the Hub cannot be reached; offline? "
                                 "set HF_HUB_OFFLINE=1 to read it from the local cache)")
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as exc:            # not found, no network, a bad split, a broken cache…
        hint = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else \
            "offline? set HF_HUB_OFFLINE=1 to read the local cache only"
        raise InputError(source, f"could not load the dataset {source!r} ({_why(exc)}; {hint})") from None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a connection to the Hub's host opens within `timeout` (assumed so behind a proxy)."""
    if any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or (80 if endpoint.scheme == "http" else 443)),
                                 timeout=timeout).close()
    except (OSError, ValueError):
        return False
    return True


def _pick_split(source: str, loaded, split: str | None):
    """(the one dataset to read, its name in messages) of a Dataset or a DatasetDict."""
    if isinstance(loaded, dict):        # a DatasetDict
        splits = list(loaded)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split is None:
            raise InputError(source, f"has several splits ({', '.join(splits)}): choose one with `split`")
        if split not in loaded:
            raise InputError(source, f"no split '{split}' (splits: {', '.join(splits) or 'none'})")
        return loaded[split], f"{source}[{split}]"
    own = getattr(loaded, "split", None)
    if split is not None and own is not None and str(own) != split:
        raise InputError(source, f"holds the split '{own}' only, not '{split}'")
    return loaded, source if split is None else f"{source}[{split}]"


def _dataset_rows(name: str, dataset) -> Rows:
    """Each row of a `datasets.Dataset` (memory-mapped Arrow), BATCH rows at a time."""
    number = 0
    try:
        for batch in dataset.with_format(None).iter(batch_size=BATCH):
            keys = list(batch)
            for values in zip(*batch.values()):
                number += 1
                yield number, dict(zip(keys, values))
    except Exception as exc:            # a cache file removed or cut under us
        raise InputError(name, f"cannot read the dataset ({_why(exc)}{_after(number)})") from None


# --- shared --------------------------------------------------------------------------------------

def _check_columns(name: str, names: list[str], fields: Fields) -> None:
    """A prompt (or response) column that no row can have is one error, not one a row."""
    for field, option in ((fields.prompt, "prompt_field"), (fields.response, "response_field")):
        if field is None or field in names or field.split(".")[0] in names:
            continue
        if field == "prompt" and option == "prompt_field" and any(f in names for f in CONVERSATION_FIELDS):
            continue
        raise InputError(name, f"missing (columns present: {', '.join(names) or 'none'}; choose one with "
                               f"`{option}`)", field=field)


def _no_split(name: str, split: str | None, what: str) -> None:
    if split is not None:
        raise InputError(name, f"split '{split}': {what} has no splits")


def _why(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0][:200] if text else "") or type(exc).__name__


def _after(number: int) -> str:
    return f", after row {number}" if number else ""
