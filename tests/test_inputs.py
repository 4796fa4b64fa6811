"""Reading prompts and writing records."""

from __future__ import annotations

import io

import pytest

from cai.errors import InputError
from cai.inputs import read_prompts
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
    assert [e.line for e in invalid] == [5, 2, 3, 4]
