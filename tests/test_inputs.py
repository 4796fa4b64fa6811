"""Reading prompts and writing records."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import sys

import pytest

from cai.errors import InputError
from cai.inputs import iter_jsonl, read_prompts, read_records
from cai.messages import prompt_id
from cai.output import RecordWriter, scan_output


def test_jsonl_keeps_ids_and_hashes_the_rest(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": 7, "prompt": "a"}\n\n{"prompt": " b "}\n{"question": "c", "prompt": "d"}\n')
    items = read_prompts(str(path))
    assert [(i.id, i.text, i.line) for i in items] == [("7", "a", 1), (prompt_id("b"), "b", 3), (prompt_id("d"), "d", 4)]


def test_text_file_and_stdin_sniffing(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("one\n\n two \n")
    assert [i.text for i in read_prompts(str(path))] == ["one", "two"]
    stdin = io.BytesIO(b'{"prompt": "x"}\n')
    assert [i.text for i in read_prompts("-", stdin=stdin)] == ["x"]
    assert [i.text for i in read_prompts("-", stdin=io.BytesIO(b"plain\n"))] == ["plain"]


def test_repeated_prompt_text_gets_distinct_stable_ids(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("same\nsame\nother\nsame\n")
    ids = [i.id for i in read_prompts(str(path))]
    base = prompt_id("same")
    assert ids == [base, f"{base}-2", prompt_id("other"), f"{base}-3"]


def test_numbering_repeated_prompts_takes_linear_work(tmp_path):
    """Issue 31: 16,000 copies of one prompt took 17 s to number (each copy tried -2, -3, … from
    the start). Counted in lines of cai/inputs.py run, not in seconds: twice the copies, about
    twice the work. An explicit id that looks like a suffix keeps the numbering as it was."""
    import cai.inputs

    def lines_run(copies: int) -> int:
        path = tmp_path / f"p{copies}.jsonl"
        path.write_text(json.dumps({"id": f"{prompt_id('same')}-3", "prompt": "x"}) + "\n"
                        + "".join(json.dumps({"prompt": "same"}) + "\n" for _ in range(copies)))
        count = 0

        def tracer(frame, event, arg):
            nonlocal count
            if frame.f_code.co_filename != cai.inputs.__file__:
                return None
            if event == "line":
                count += 1
            return tracer

        sys.settrace(tracer)
        try:
            ids = [i.id for i in read_prompts(str(path))]
        finally:
            sys.settrace(None)
        base = prompt_id("same")
        assert ids[:5] == [f"{base}-3", base, f"{base}-2", f"{base}-4", f"{base}-5"]
        assert len(set(ids)) == len(ids) == copies + 1
        return count

    small, large = lines_run(400), lines_run(800)
    assert large < 2.3 * small, (small, large)


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "no such file"),
    (lambda p: p.mkdir(), "is a directory"),
    (lambda p: p.write_text("\n \n"), "no prompts found"),
])
def test_unreadable_sources(tmp_path, setup, message):
    path = tmp_path / "p.txt"
    setup(path)
    with pytest.raises(InputError, match=message):
        read_prompts(str(path))


def test_writer_writes_whole_lines_and_resume_cuts_a_torn_tail(tmp_path):
    path = tmp_path / "out.jsonl"
    writer = RecordWriter(str(path))
    writer.write({"id": "a", "text": "é"})
    writer.write({"id": "b"})
    writer.close()
    assert path.read_text(encoding="utf-8") == '{"id": "a", "text": "é"}\n{"id": "b"}\n'
    with path.open("a") as fp:
        fp.write('{"id": "c", "te')
    before = path.read_bytes()
    existing = scan_output(path)
    assert existing.ids == {"a", "b"} and existing.torn and existing.first == {"id": "a", "text": "é"}
    assert path.read_bytes() == before, "scanning never changes the file"
    writer = RecordWriter(str(path), append_at=existing.whole_bytes)
    writer.write({"id": "c"})
    writer.close()
    assert path.read_text(encoding="utf-8") == '{"id": "a", "text": "é"}\n{"id": "b"}\n{"id": "c"}\n'


def test_scan_refuses_a_file_broken_in_the_middle(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(InputError, match=r"out.jsonl:2: not a whole cai record"):
        scan_output(path)


def test_invalid_lines_can_be_collected_instead_of_raised(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "a"}\nnot json\n{"prompt": ""}\n{"x": 1}\n\xff\n{"prompt": "b"}\n')
    invalid = []
    items = read_prompts(str(path), invalid=invalid)
    assert [i.text for i in items] == ["a", "b"]
    assert [e.line for e in invalid] == [2, 3, 4, 5]          # in the order of the file


# --- index: a prompt's place in the whole input -------------------------------------------------

def test_index_counts_every_prompt_line_invalid_ones_too_but_not_blank_ones(tmp_path):
    """Skipping a bad line (--skip-invalid) must not move the prompts after it: round-robin
    sampling counts by index, so a skipped line would change every later record's principle."""
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n\n{"prompt": ""}\nnot json\n\xff\n{"id": 1, "prompt": "b"}\n'
                     b'{"id": 1, "prompt": "c"}\n{"prompt": "a"}\n\n{"prompt": "d"}\n')
    invalid = []
    items = read_prompts(str(path), invalid=invalid)
    assert [(i.text, i.index, i.line) for i in items] == [("a", 0, 1), ("b", 4, 6), ("a", 6, 8), ("d", 7, 10)]
    assert items[2].id == f"{prompt_id('a')}-2"          # a repeated text keeps its own index
    assert [e.line for e in invalid] == [3, 4, 5, 7]     # the duplicate id on line 7 counts too
    assert [e.index for e in invalid] == [1, 2, 3, 5]    # and each carries the place it would have had
    fixed = tmp_path / "fixed.jsonl"
    fixed.write_text('{"prompt": "a"}\n{"prompt": "x"}\n{"prompt": "x2"}\n{"prompt": "x3"}\n{"id": 1, "prompt": "b"}\n'
                     '{"id": 2, "prompt": "c"}\n{"prompt": "a"}\n{"prompt": "d"}\n')
    assert [i.index for i in read_prompts(str(fixed)) if i.text in ("b", "d")] == [4, 7]


def test_index_in_text_files(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"\n one\n\n\xfe\ntwo\n  \nthree\n")
    invalid = []
    items = read_prompts(str(path), invalid=invalid)
    assert [(i.text, i.index, i.line) for i in items] == [("one", 0, 2), ("two", 2, 5), ("three", 3, 7)]
    assert [e.line for e in invalid] == [4]


# --- CSV and TSV tables -----------------------------------------------------------------------

def test_csv_reads_the_prompt_column_and_ids(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('id,prompt,notes\n7,"Hello, world",x\n,"a ""quoted""\nprompt over lines",y\n\nq3,third,\n',
                    encoding="utf-8")
    items = read_prompts(str(path))
    assert [(i.id, i.text, i.line, i.index) for i in items] == [
        ("7", "Hello, world", 2, 0),
        (prompt_id('a "quoted"\nprompt over lines'), 'a "quoted"\nprompt over lines', 3, 1),
        ("q3", "third", 6, 2)]          # a row's line is the one it starts on; the blank line 5 is no row


def test_tsv_and_prompt_field_and_bom(tmp_path):
    path = tmp_path / "p.tsv"
    path.write_bytes("\ufeffquestion\tanswer\nWhat is 2+2?\t4\nWhy, then?\tno\n".encode("utf-8"))
    assert [i.text for i in read_prompts(str(path), prompt_field="question")] == ["What is 2+2?", "Why, then?"]


def test_csv_missing_column_names_line_1_and_the_columns(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("question,answer\nhi,there\n")
    with pytest.raises(InputError, match=r"p\.csv:1: prompt: missing \(columns present: question, answer; "
                                         r"choose one with `prompt_field`\)"):
        read_prompts(str(path))


def test_csv_bad_rows_name_their_line_and_can_be_skipped(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(b'prompt,id\nfine,1\n"",2\n  ,3\nhas,too,many\n\xff\xfe,5\n"multi\nline"\nnul\x00here,7\nlast,8\n')
    with pytest.raises(InputError, match=r"p\.csv:3: prompt: empty prompt"):
        read_prompts(str(path))
    invalid = []
    items = read_prompts(str(path), invalid=invalid)
    assert [(i.text, i.id, i.index) for i in items] == [("fine", "1", 0), ("multi\nline", prompt_id("multi\nline"), 5),
                                                      ("last", "8", 7)]
    assert [(e.line, e.detail) for e in invalid] == [
        (3, "empty prompt"), (4, "empty prompt"),
        (5, "3 cells where the header (line 1) has 2 (a cell holding the delimiter must be quoted)"),
        (6, "not valid UTF-8 text"), (9, "contains a NUL byte")]


def test_csv_syntax_errors_and_long_cells(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('prompt\nok\n"never closed\nand on\n')
    with pytest.raises(InputError, match=r"p\.csv:3: invalid CSV: a quoted cell is never closed"):
        read_prompts(str(path), invalid=[])
    long = "word " * 60_000                              # past the csv module's default 128 KiB cell limit
    path.write_text(f'prompt\n"{long}"\n')
    assert read_prompts(str(path))[0].text == long.strip()


# --- compressed input -------------------------------------------------------------------------

COMPRESSORS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}


def _zstd():
    zstandard = pytest.importorskip("zstandard")
    return zstandard.ZstdCompressor().compress


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz", ".zst"])
@pytest.mark.parametrize("inner, body, texts", [
    (".jsonl", b'{"id": "a", "prompt": "one"}\n{"prompt": "two"}\n', ["one", "two"]),
    (".csv", b"prompt,id\none,a\ntwo,\n", ["one", "two"]),
    (".txt", b'{"looks like": "json"}\ntwo\n', ['{"looks like": "json"}', "two"]),
])
def test_compressed_files_read_by_the_suffix_before_the_compression(tmp_path, suffix, inner, body, texts):
    """A .jsonl.gz was read as text and reported as "not valid UTF-8"."""
    compress = _zstd() if suffix == ".zst" else COMPRESSORS[suffix]
    path = tmp_path / f"prompts{inner}{suffix}"
    path.write_bytes(compress(body))
    items = read_prompts(str(path))
    assert [i.text for i in items] == texts and [i.line for i in items] == ([1, 2] if inner != ".csv" else [2, 3])


def test_compressed_stdin_and_concatenated_members(tmp_path):
    data = gzip.compress(b'{"prompt": "one"}\n') + gzip.compress(b'{"prompt": "two"}\n')
    assert [i.text for i in read_prompts("-", stdin=io.BytesIO(data))] == ["one", "two"]
    assert [i.text for i in read_prompts("-", stdin=io.BytesIO(lzma.compress(b"plain\n")))] == ["plain"]


@pytest.mark.parametrize("name, data, message", [
    ("p.jsonl.gz", b'{"prompt": "not compressed"}\n', r"p\.jsonl\.gz: not a valid gzip file \(it does not start with the gzip signature\)"),
    ("p.jsonl.gz", gzip.compress(b'{"prompt": "x"}\n' * 50)[:-9], r"p\.jsonl\.gz: not a valid gzip file \(it ends early: cut off\?\)"),
    ("p.jsonl.gz", gzip.compress(b'{"prompt": "x"}\n')[:-8] + b"\0" * 8, r"p\.jsonl\.gz: not a valid gzip file \(.*check"),
    ("p.txt.bz2", b"BZh9" + b"\0" * 40, r"p\.txt\.bz2: not a valid bzip2 file"),
    ("p.csv.xz", lzma.compress(b"prompt\nx\n")[:20], r"p\.csv\.xz: not a valid xz file"),
])
def test_corrupt_compressed_files_are_one_input_error(tmp_path, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(InputError, match=message):
        read_prompts(str(path))


def test_zstd_without_the_package_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)
    monkeypatch.setitem(sys.modules, "compression", None)
    path = tmp_path / "p.jsonl.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 20)
    with pytest.raises(InputError, match=r"p\.jsonl\.zst: is zstd-compressed: .*\(pip install zstandard\)"):
        read_prompts(str(path))


# --- NUL bytes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, data, line, field", [
    ("p.txt", b"fine\nnul\x00here\n", 2, None),
    ("p.jsonl", b'{"prompt": "fine"}\n{"prompt": "nul\x00here"}\n', 2, None),
    ("p.jsonl", b'{"prompt": "fine"}\n{"prompt": "escaped \\u0000 nul"}\n', 2, "prompt"),
    ("p.jsonl", b'{"prompt": "fine"}\n{"id": "a\\u0000", "prompt": "x"}\n', 2, "id"),
    ("p.csv", b"prompt\nfine\nnul\x00here\n", 3, "prompt"),
])
def test_nul_bytes_are_rejected_with_file_and_line(tmp_path, name, data, line, field):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(InputError, match="contains a NUL byte") as caught:
        read_prompts(str(path))
    assert (caught.value.line, caught.value.field) == (line, field)
    invalid = []
    assert [i.text for i in read_prompts(str(path), invalid=invalid)] == ["fine"]
    assert [e.line for e in invalid] == [line]


# --- cai's own record files, compressed ---------------------------------------------------------

def test_iter_jsonl_and_read_records_read_compressed_files(tmp_path):
    records = [{"id": str(n), "prompt": "p", "chosen": "c", "rejected": "r"} for n in range(3)]
    body = "".join(json.dumps(r) + "\n" for r in records).encode()
    for suffix, compress in COMPRESSORS.items():
        path = tmp_path / f"pairs.jsonl{suffix}"
        path.write_bytes(compress(body))
        assert [(n, r["id"]) for _, n, r in iter_jsonl(str(path))] == [(1, "0"), (2, "1"), (3, "2")]
        assert read_records(str(path)) == records
    plain_name = tmp_path / "pairs-no-suffix"                   # told by its first bytes
    plain_name.write_bytes(gzip.compress(body))
    assert len(read_records(str(plain_name))) == 3
    assert [r["id"] for _, _, r in iter_jsonl("-", stdin=io.BytesIO(bz2.compress(body)))] == ["0", "1", "2"]
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(body * 20)[:-9])
    # cai writes compressed outputs a batch (a member) at a time: a file that stops inside its last
    # member is what a killed writer leaves, read as a torn end is (issue 31), never a short read
    with pytest.raises(InputError, match=r"cut\.jsonl\.gz: it stops inside its last compressed member .*rerun cai generate"):
        read_records(str(cut))
    warned = []
    assert len(list(iter_jsonl(str(cut), warn=warned.append))) == 60
    assert warned == [f"{cut}: stops inside its last compressed member after line 60 (a writer stopped mid-batch); "
                      "read up to there"]


def test_cut_off_zstd_is_an_error_not_a_short_read(tmp_path):
    """zstandard's own stream reader ends quietly at a cut-off frame: records would go missing."""
    compress = _zstd()
    path = tmp_path / "p.txt.zst"
    path.write_bytes(compress(b"a prompt\n" * 1000)[:-4])
    with pytest.raises(InputError, match=r"p\.txt\.zst: not a valid zstd file \(it ends early"):
        read_prompts(str(path))


def test_the_writer_never_writes_nan_and_escapes_a_lone_surrogate(tmp_path):
    """No record line that JSON readers refuse: NaN is an error that writes nothing, a lone
    surrogate (which UTF-8 cannot hold) is written as its JSON escape."""
    from cai.errors import OutputError

    out = tmp_path / "out.jsonl"
    writer = RecordWriter(str(out))
    writer.write({"id": "a", "text": "x\ud800y"})
    with pytest.raises(OutputError, match="'b' holds NaN or infinity"):
        writer.write({"id": "b", "judge": {"preference": float("nan")}})
    writer.close()
    assert out.read_bytes() == b'{"id": "a", "text": "x\\ud800y"}\n'
    assert json.loads(out.read_text())["text"] == "x\ud800y"


# ---- issue 31: --input-format, and field options on plain text ----

def test_input_format_reads_stdin_and_unhelpfully_named_files_as_it_says(tmp_path):
    from cai.rows import Fields

    table = b"prompt,id\nHello there,1\nWrite a poem,2\n"
    # without it, CSV on stdin is text: its header becomes a prompt
    assert [i.text for i in read_prompts("-", stdin=io.BytesIO(table))][0] == "prompt,id"
    items = read_prompts("-", stdin=io.BytesIO(table), input_format="csv")
    assert [(i.id, i.text, i.line) for i in items] == [("1", "Hello there", 2), ("2", "Write a poem", 3)]
    tsv = read_prompts("-", stdin=io.BytesIO(gzip.compress(b"q\tid\nA\t1\n")), input_format="tsv", fields=Fields(prompt="q"))
    assert [(i.id, i.text) for i in tsv] == [("1", "A")]
    odd = tmp_path / "prompts.data"
    odd.write_bytes(b'  {"prompt": "x"}\nnot json\n')
    with pytest.raises(InputError, match=r"prompts.data:2: invalid JSON"):
        read_prompts(str(odd), input_format="jsonl")
    odd.write_bytes(b'{"prompt": "x"}\n')
    assert [i.text for i in read_prompts(str(odd), input_format="text")] == ['{"prompt": "x"}']
    named = tmp_path / "p.txt"
    named.write_bytes(table)
    assert [i.text for i in read_prompts(str(named), input_format="csv")] == ["Hello there", "Write a poem"]


@pytest.mark.parametrize("source, fmt, message", [
    ("-", "parquet", "input_format: parquet is read from a file, not from stdin"),
    ("-", "xml", "input_format: unknown value 'xml'; choose from jsonl, csv, tsv, text, parquet, arrow"),
    ("@dir", "csv", "input_format: is for a prompts file or stdin; "),
])
def test_input_format_that_cannot_apply_is_an_option_error(tmp_path, source, fmt, message):
    from cai.errors import OptionError

    source = str(tmp_path) if source == "@dir" else source
    with pytest.raises(OptionError) as caught:
        read_prompts(source, stdin=io.BytesIO(b"a\n"), input_format=fmt)
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize("fields, how, option", [
    ({"prompt": "question"}, None, "prompt_field"),
    ({"response": "answer"}, None, "response_field"),
    ({"prompt": "question"}, "text", "prompt_field"),
])
def test_field_options_on_plain_text_are_an_error_not_ignored(tmp_path, fields, how, option):
    from cai.rows import Fields
    from cai.errors import OptionError

    path = tmp_path / "p.txt"
    path.write_text("one\ntwo\n")
    for source, stdin in ((str(path), None), ("-", io.BytesIO(b"one\ntwo\n"))):
        with pytest.raises(OptionError) as caught:
            read_prompts(source, stdin=stdin, fields=Fields(**fields), input_format=how)
        assert caught.value.option == option and "read as plain text, one prompt a line" in str(caught.value)
    # the defaults are no field option; JSONL and CSV take them
    assert [i.text for i in read_prompts(str(path))] == ["one", "two"]
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("question,answer\nq1,a1\n")
    assert [i.text for i in read_prompts(str(csv_path), fields=Fields(prompt="question", response="answer"))] == ["q1"]
    # an empty text file is still "no prompts found"
    empty = tmp_path / "e.txt"
    empty.write_text("\n")
    with pytest.raises(InputError, match="no prompts found"):
        read_prompts(str(empty), fields=Fields(**fields))


def test_input_format_parquet_for_a_file_named_otherwise(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "rows.bin"
    pq.write_table(pa.table({"prompt": ["a b", "c d"]}), path)
    assert [i.text for i in read_prompts(str(path), input_format="parquet")] == ["a b", "c d"]
    with pytest.raises(InputError, match="nope.bin: no such file"):
        read_prompts(str(tmp_path / "nope.bin"), input_format="parquet")


def test_scan_output_of_a_compressed_output_keeps_its_whole_members(tmp_path):
    """Issue 31: a compressed output is continued from its whole members: a member cut off, or
    the members after the last one that ends on a whole line, are the torn end a resume cuts."""
    line = lambda n: json.dumps({"id": f"r{n}", "meta": {}}).encode() + b"\n"      # noqa: E731
    one, two = gzip.compress(line(1) + line(2)), gzip.compress(line(3))
    path = tmp_path / "pairs.jsonl.gz"
    path.write_bytes(one + two + gzip.compress(line(4))[:-5])
    existing = scan_output(path)
    assert (existing.ids, existing.first["id"], existing.whole_bytes, existing.torn) == (
        {"r1", "r2", "r3"}, "r1", len(one + two), True)
    path.write_bytes(one + gzip.compress(line(3)[:10]))         # a member that ends mid-line
    assert (scan_output(path).ids, scan_output(path).whole_bytes) == ({"r1", "r2"}, len(one))
    path.write_bytes(one + b"\0" * 8 + two)                    # damage between whole members: not a torn end
    with pytest.raises(InputError, match=r"pairs\.jsonl\.gz: not a valid gzip file"):
        scan_output(path)
    path.write_bytes(one + gzip.compress(line(3))[:9] + b"\0" * 4096)     # a crash's unsynced tail: zeros
    assert (scan_output(path).ids, scan_output(path).whole_bytes, scan_output(path).torn) == ({"r1", "r2"}, len(one), True)
    path.write_bytes(gzip.compress(line(1) + b"not json\n"))
    with pytest.raises(InputError, match=r"pairs\.jsonl\.gz:2: not a whole cai record"):
        scan_output(path)
    path.write_bytes(b"")
    assert scan_output(path) == type(existing)(set(), None, 0, torn=False)


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz", ".zst"])
def test_record_writer_writes_a_member_per_sync(tmp_path, suffix):
    if suffix == ".zst":
        pytest.importorskip("zstandard")
    path = tmp_path / f"out.jsonl{suffix}"
    writer = RecordWriter(str(path))
    writer.close()
    assert path.stat().st_size > 0 and list(iter_jsonl(str(path))) == [], "no record: a valid empty file"
    writer = RecordWriter(str(path), append_at=scan_output(path).whole_bytes)
    for n in range(5):
        writer.write({"id": str(n)})
        if n % 2:
            writer.sync()
    writer.close()
    assert [r["id"] for _, _, r in iter_jsonl(str(path))] == ["0", "1", "2", "3", "4"]
    existing = scan_output(path)
    assert existing.ids == {"0", "1", "2", "3", "4"} and existing.whole_bytes == path.stat().st_size
