"""Prompts from Parquet, Arrow and `datasets` (folders and ids), and lazy line reading: every
format gives the same PromptItems, and every bad input is one InputError naming file:row:field."""

from __future__ import annotations

import csv
import gzip
import io
import json
import sys

import pytest

from cai.errors import InputError, OptionError
from cai.inputs import read_prompts

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

ROWS = [{"id": "a", "prompt": "First prompt"}, {"id": None, "prompt": "Second, with a comma"},
        {"id": "c", "prompt": 'Third "quoted"\nover two lines'}, {"id": None, "prompt": "Fourth"},
        {"id": "e", "prompt": "Fifth é"}]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test here may reach the network: the Hub is offline, in the environment and in the
    constants the libraries read when they were imported."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for module, name in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                         ("datasets.config", "HF_DATASETS_OFFLINE")):
        if module in sys.modules and hasattr(sys.modules[module], name):
            monkeypatch.setattr(sys.modules[module], name, True)
    monkeypatch.setattr("cai.columnar._hub_reachable", lambda *a, **k: pytest.fail("the test tried the network"))


def _table(rows=ROWS):
    return pa.Table.from_pylist(rows)


def write_jsonl(path, rows=ROWS):
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in rows))


def write_csv(path, rows=ROWS):
    with path.open("w", newline="", encoding="utf-8") as fp:
        writer = csv.writer(fp)
        writer.writerow(["id", "prompt"])
        writer.writerows([r["id"] or "", r["prompt"]] for r in rows)


def write_arrow(path, table, stream: bool):
    with pa.OSFile(str(path), "wb") as sink:
        writer = (pa.ipc.new_stream if stream else pa.ipc.new_file)(sink, table.schema)
        writer.write_table(table, max_chunksize=2)          # several record batches
        writer.close()


@pytest.fixture
def sources(tmp_path):
    """The same five prompts in every format, with the line of each prompt's first row."""
    datasets = pytest.importorskip("datasets")
    made = {}
    write_jsonl(tmp_path / "p.jsonl")
    made["jsonl"] = (str(tmp_path / "p.jsonl"), None, 1)
    write_csv(tmp_path / "p.csv")
    made["csv"] = (str(tmp_path / "p.csv"), None, 2)        # row 1 is the header; row 3 spans two lines
    (tmp_path / "p.jsonl.gz").write_bytes(gzip.compress((tmp_path / "p.jsonl").read_bytes()))
    made["jsonl.gz"] = (str(tmp_path / "p.jsonl.gz"), None, 1)
    pq.write_table(_table(), tmp_path / "p.parquet", row_group_size=2)
    made["parquet"] = (str(tmp_path / "p.parquet"), None, 1)
    for stream in (True, False):
        path = tmp_path / f"p-{'stream' if stream else 'file'}.arrow"
        write_arrow(path, _table(), stream)
        made[path.stem] = (str(path), None, 1)
    dataset = datasets.Dataset.from_list(ROWS)
    dataset.save_to_disk(str(tmp_path / "saved"))
    made["dataset"] = (str(tmp_path / "saved"), None, 1)
    datasets.DatasetDict({"train": dataset, "test": dataset.select([0])}).save_to_disk(str(tmp_path / "dict"))
    made["dataset-dict"] = (str(tmp_path / "dict"), "train", 1)
    return made


def test_every_format_gives_the_same_prompts(sources):
    expected = None
    for label, (source, split, first) in sources.items():
        items = read_prompts(source, split=split)
        lines = [i.line for i in items]
        if label == "csv":
            assert lines == [2, 3, 4, 6, 7], label            # a row starts a line; row 3 spans two
        else:
            assert lines == [1, 2, 3, 4, 5], label
        seen = [(i.id, i.text, i.index, i.history, i.response) for i in items]
        expected = expected or seen
        assert seen == expected, label
    assert [e[0] for e in expected][::2] == ["a", "c", "e"] and expected[2][1] == 'Third "quoted"\nover two lines'


def test_a_messages_list_column_gives_a_conversation(tmp_path):
    messages = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    table = pa.table({"messages": pa.array([
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Tell me a joke"}],
        [{"role": "user", "content": "Answer this"}, {"role": "assistant", "content": "Given answer"}],
    ], type=messages)})
    path = tmp_path / "chat.parquet"
    pq.write_table(table, path)
    first, second = read_prompts(str(path))
    assert first.text == "Tell me a joke" and first.line == 1 and first.response is None
    assert first.history == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello!"})
    assert (second.text, second.history, second.response, second.index) == ("Answer this", (), "Given answer", 1)


def test_parquet_is_read_batch_by_batch_and_rows_keep_their_numbers(tmp_path):
    rows = [{"prompt": f"prompt {n}"} for n in range(2600)]
    rows[2100] = {"prompt": None}
    pq.write_table(_table(rows), tmp_path / "big.parquet", row_group_size=700)
    invalid = []
    items = read_prompts(str(tmp_path / "big.parquet"), invalid=invalid)
    assert len(items) == 2599 and items[-1].line == 2600 and items[-1].index == 2599
    assert [str(e) for e in invalid] == [f"{tmp_path / 'big.parquet'}:2101: prompt: expected a string or a "
                                         "list of chat messages, got null"]
    write_arrow(tmp_path / "big.arrow", _table(rows), stream=True)        # 2 rows a batch, 1,300 batches
    assert [i.line for i in read_prompts(str(tmp_path / "big.arrow"), invalid=[])] == [i.line for i in items]


# --- bad inputs: one line each ------------------------------------------------------------------

def test_null_prompt_cell_names_file_row_and_field(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(_table([{"prompt": "fine"}, {"prompt": None}]), path)
    with pytest.raises(InputError) as caught:
        read_prompts(str(path))
    assert str(caught.value) == f"{path}:2: prompt: expected a string or a list of chat messages, got null"
    assert (caught.value.line, caught.value.field, caught.value.index) == (2, "prompt", 1)


@pytest.mark.parametrize("writer", ["parquet", "arrow", "dataset"])
def test_missing_column_lists_the_columns(tmp_path, writer):
    rows = [{"question": "q", "id": "1"}]
    path = tmp_path / f"p.{writer}"
    if writer == "parquet":
        pq.write_table(_table(rows), path)
    elif writer == "arrow":
        write_arrow(path, _table(rows), stream=False)
    else:
        pytest.importorskip("datasets").Dataset.from_list(rows).save_to_disk(str(path))
    with pytest.raises(InputError, match=r"^.*p\.\w+: prompt: missing \(columns present: question, id; "
                                         r"choose one with `prompt_field`\)$"):
        read_prompts(str(path), invalid=[])
    assert read_prompts(str(path), prompt_field="question")[0].text == "q"


@pytest.mark.parametrize("name, data, message", [
    ("p.parquet", b"PAR1 this is not parquet at all", r"p\.parquet: not a valid Parquet file \(.+\)$"),
    ("p.parquet", b"", r"p\.parquet: not a valid Parquet file \(.+\)$"),
    ("p.arrow", b'{"prompt": "json, not arrow"}\n', r"p\.arrow: not a valid Arrow IPC file \(.+\)$"),
    ("p.parquet.gz", gzip.compress(b"PAR1"), r"p\.parquet\.gz: a compressed Parquet/Arrow file: decompress it first"),
])
def test_corrupt_files_are_one_input_error(tmp_path, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(InputError, match=message) as caught:
        read_prompts(str(path))
    assert "\n" not in str(caught.value)


def test_a_truncated_parquet_file_is_one_input_error(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(_table(ROWS * 100), path, row_group_size=50)
    data = path.read_bytes()
    path.write_bytes(data[:200] + b"\0" * 300 + data[500:])         # a page broken, the footer intact
    with pytest.raises(InputError, match=r"p\.parquet: not a valid Parquet file \(") as caught:
        read_prompts(str(path))
    assert "\n" not in str(caught.value)


def test_dataset_splits(sources):
    folder = sources["dataset-dict"][0]
    with pytest.raises(InputError, match=r"dict: has several splits \(train, test\): choose one with `split`$"):
        read_prompts(folder)
    with pytest.raises(InputError, match=r"dict: no split 'validation' \(splits: train, test\)$"):
        read_prompts(folder, split="validation")
    assert [i.id for i in read_prompts(folder, split="test")] == ["a"]
    import datasets
    datasets.DatasetDict({"test": datasets.Dataset.from_list([{"prompt": " "}])}).save_to_disk(folder + "2")
    with pytest.raises(InputError, match=r"dict2\[test\]:1: prompt: empty prompt"):
        read_prompts(folder + "2")                  # a single split is read whatever its name
    with pytest.raises(InputError, match=r"p\.parquet: split 'train': a Parquet file has no splits"):
        read_prompts(sources["parquet"][0], split="train")
    with pytest.raises(OptionError, match=r"split: is for a Parquet/Arrow file"):
        read_prompts(sources["jsonl"][0], split="train")


def test_unknown_dataset_id_offline_is_one_line_and_quick(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=r"^nobody-cai-test/no-such-dataset: could not load the dataset "
                                         r"'nobody-cai-test/no-such-dataset' \(.*HF_HUB_OFFLINE.*\)$") as caught:
        read_prompts("nobody-cai-test/no-such-dataset")
    assert "\n" not in str(caught.value)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setattr("cai.columnar._hub_reachable", lambda *a, **k: False)
    with pytest.raises(InputError, match=r"could not load the dataset .*the Hub cannot be reached; offline\? "
                                         r"set HF_HUB_OFFLINE=1"):
        read_prompts("nobody-cai-test/no-such-dataset")


def test_paths_that_only_look_like_ids_stay_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for source in ("data/prompts", "missing/prompts.jsonl", "other/p.parquet"):
        with pytest.raises(InputError, match=rf"^{source}: no such file$"):
            read_prompts(source)
    with pytest.raises(InputError, match="is a directory, not a prompts file"):
        read_prompts("data")


def test_missing_optional_packages_say_what_to_install(tmp_path, monkeypatch, sources):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(InputError, match=r"saved: reading a `datasets` folder or dataset id needs the datasets "
                                         r"package \(pip install datasets\)$"):
        read_prompts(sources["dataset"][0])
    for module in ("pyarrow", "pyarrow.parquet", "pyarrow.ipc"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(InputError, match=r"p\.parquet: reading Parquet needs pyarrow \(pip install pyarrow\)$"):
        read_prompts(sources["parquet"][0])
    with pytest.raises(InputError, match=r"p-file\.arrow: reading Arrow needs pyarrow \(pip install pyarrow\)$"):
        read_prompts(sources["p-file"][0])


# --- through the run's selection ----------------------------------------------------------------

def test_select_reads_parquet_and_a_split(sources):
    from cai.constitution import load_constitution
    from cai.options import GenerateOptions
    from cai.pipeline import RunConfig
    from cai.run.select import select

    constitution = load_constitution("harmless")
    selection = select(sources["parquet"][0], GenerateOptions(limit=3), constitution, RunConfig())
    assert [i.text for i in selection.items] == [r["prompt"] for r in ROWS[:3]]
    assert selection.ids == [i.id for i in selection.items] and len(selection.all_ids) == 5
    options = GenerateOptions()
    options.split = "train"                 # what the CLI's --split will set
    assert select(sources["dataset-dict"][0], options, constitution, RunConfig()).ids == \
        [i.id for i in read_prompts(sources["jsonl"][0])]


@pytest.mark.parametrize("sampling", ["random", "cycle", "all"])
def test_record_ids_are_the_ids_record_plans_makes(sampling, sources):
    from cai.constitution import load_constitution
    from cai.pipeline import RunConfig, record_ids, record_plans

    constitution, config = load_constitution("harmless"), RunConfig(sampling=sampling, revisions=2)
    items = read_prompts(sources["jsonl"][0])
    assert [[rid for rid, _ in records] for _, records in record_plans(constitution, config, items)] == \
        [record_ids(constitution, config, item) for item in items]


# --- lazy line reading keeps what whole-file reading did ------------------------------------------

class _Pipe(io.RawIOBase):
    """A stream that cannot seek and hands out a few bytes a read, as a pipe may."""

    def __init__(self, data: bytes):
        self._data = data

    def readable(self):
        return True

    def readinto(self, buffer):
        n = min(len(buffer), 3, len(self._data))
        buffer[:n], self._data = self._data[:n], self._data[n:]
        return n


def test_a_pipe_is_sniffed_for_compression_and_format():
    body = b'\n  \n{"prompt": "one"}\n{"prompt": "two"}\n'
    assert [i.text for i in read_prompts("-", stdin=io.BufferedReader(_Pipe(gzip.compress(body))))] == ["one", "two"]
    items = read_prompts("-", stdin=io.BufferedReader(_Pipe(b"\xef\xbb\xbfplain\n\n second \n")))
    assert [(i.text, i.line, i.index) for i in items] == [("plain", 1, 0), ("second", 3, 1)]


def test_lone_carriage_returns_still_end_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"one\rtwo\r\n\rthree\n")
    assert [(i.text, i.line) for i in read_prompts(str(path))] == [("one", 1), ("two", 2), ("three", 4)]


def test_every_format_makes_the_same_records(sources):
    """Issue 18's bar: Parquet, Arrow, CSV, gz and a saved datasets folder each give the records
    the same prompts give as JSONL (a whole run, through the public API)."""
    import json

    import cai
    from cai.backends.scripted import ScriptedBackend

    def records(source, split):
        summary = cai.generate(source, None, model=ScriptedBackend(), split=split, filter=False)
        assert summary.complete
        return sorted(json.dumps({**r, "meta": {k: v for k, v in r["meta"].items() if k != "created"}}, sort_keys=True)
                      for r in summary.records)

    expected = records(*sources["jsonl"][:2])
    assert len(expected) == 5
    for label, (source, split, _) in sources.items():
        assert records(source, split) == expected, label
