"""`cai stats`: exact figures of small hand-made records files, end to end through the CLI."""

from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

from cai.cli import app
from cai.records import to_format


def run(*args, input=None):
    return CliRunner().invoke(app, ["stats", *(str(a) for a in args)], input=input)


def record(rid, rejected="r", chosen="c", prompt="p", principle="harm-1", response="stop", revision=("stop",),
           judge=None, cleaned=None, **extra):
    meta = {"model": "m", "constitution": "harmless@abc", "seed": 0, "params": {},
            "finish_reasons": {"response": response, "critique": ["stop"] * len(revision), "revision": list(revision)},
            "tokens": {"prompt": 10, "completion": 5}}
    if cleaned:
        meta["cleaned"] = cleaned
    out = {"id": rid, "prompt": prompt, "chosen": chosen, "rejected": rejected, "principle": principle,
           "critique": "crit", "rounds": [{"principle": principle, "critique": "crit", "revision": chosen}], "meta": meta}
    if judge is not None:
        out["judge"] = {"model": "j", "preference": judge[0], "orders": list(judge[1:]), "label": judge[0], "swapped": False}
    return {**out, **extra}


def write(path, rows, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail, encoding="utf-8")
    return path


def report_of(*args, input=None):
    result = run(*args, "--json", input=input)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), result


def test_kept_dropped_and_reasons(tmp_path):
    pairs = write(tmp_path / "pairs.jsonl", [record("a"), record("b", principle="harm-2"), record("c")])
    write(tmp_path / "pairs.jsonl.filtered.jsonl", [
        {"id": "s", "filter": {"reasons": ["meta"]}},                                          # a stub
        {**record("d", principle="harm-2"), "filter": {"reasons": ["unchanged", "truncated", "unchanged"]}},
        {**record("e"), "filter": {"reasons": ["truncated"]}},
    ], tail='{"id": "f", "filt')                                                               # torn last line
    # what the run could not make: every prompt is counted in exactly one place
    write(tmp_path / "pairs.jsonl.failures.jsonl", [{"id": "g", "stage": "response", "error": "HTTP 500"}])
    write(tmp_path / "pairs.jsonl.skipped.jsonl", [{"id": "h", "kind": "too long"}, {"id": None, "kind": "invalid"}])
    report, result = report_of(pairs)
    assert report["input"] == {
        "records": str(pairs), "filtered": f"{pairs}.filtered.jsonl", "kept": 3, "dropped": 3, "failed": 1,
        "skipped": 2, "skipped_by_kind": {"too long": 1, "invalid": 1}, "total": 9,
        "side_files": {"failed": f"{pairs}.failures.jsonl", "skipped": f"{pairs}.skipped.jsonl"},
        "dropped_by_reason": {"truncated": 2, "meta": 1, "unchanged": 1}, "torn_lines": 1}
    assert report["principles"] == {
        "harm-1": {"kept": 2, "dropped": 1, "judge_mean": None},
        "harm-2": {"kept": 1, "dropped": 1, "judge_mean": None},
        "?": {"kept": 0, "dropped": 1, "judge_mean": None}}
    assert "pairs.jsonl.filtered.jsonl:4: torn last line" in result.stderr


def test_human_report_on_stderr(tmp_path):
    pairs = write(tmp_path / "pairs.jsonl", [record("a", judge=(0.7, 0.6, 0.8)), record("b", principle="harm-2")])
    write(tmp_path / "pairs.jsonl.filtered.jsonl", [{"id": "s", "filter": {"reasons": ["refusal"]}}])
    result = run(pairs)
    assert result.exit_code == 0, result.output
    assert result.stdout == "", "stdout carries data only"
    for text in ("cai stats", "dropped: refusal", "1 (33.3%)", "principles", "harm-2", "distributions",
                 "near-identical", "judge: P(revision better)", "finish reasons"):
        assert text in result.stderr, text


def test_missing_side_file_means_none_dropped(tmp_path):
    pairs = write(tmp_path / "pairs.jsonl", [record("a"), record("b")])
    report, _ = report_of(pairs)
    assert report["input"]["filtered"] is None
    assert (report["input"]["kept"], report["input"]["dropped"], report["input"]["total"]) == (2, 0, 2)
    assert report["input"]["dropped_by_reason"] == {}
    assert "no side file: none dropped" in run(pairs).stderr
    write(tmp_path / "pairs.jsonl.filtered.jsonl", [{"id": "s", "filter": {"reasons": ["meta"]}}])
    assert "no side file" not in run(pairs).stderr


def test_filtered_override(tmp_path):
    pairs = write(tmp_path / "pairs.jsonl", [record("a")])
    write(tmp_path / "pairs.jsonl.filtered.jsonl", [{"id": "s", "filter": {"reasons": ["meta"]}}])
    other = write(tmp_path / "dropped.jsonl", [{"id": "x", "filter": {"reasons": ["empty"]}},
                                              {"id": "y", "filter": {"reasons": ["empty", "copied"]}}])
    report, _ = report_of(pairs, "--filtered", other)
    assert report["input"]["filtered"] == str(other)
    assert report["input"]["dropped_by_reason"] == {"empty": 2, "copied": 1}
    assert report["input"]["total"] == 3
    result = run(pairs, "--filtered", tmp_path / "nope.jsonl")
    assert result.exit_code == 2 and "nope.jsonl: no such file" in result.stderr


def test_stdin_has_no_default_side_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "-.filtered.jsonl", [{"id": "s", "filter": {"reasons": ["meta"]}}])
    text = "".join(json.dumps(r) + "\n" for r in (record("a"), record("b")))
    report, _ = report_of("-", input=text)
    assert report["input"]["records"] == "-" and report["input"]["dropped"] == 0 and report["input"]["kept"] == 2
    side = write(tmp_path / "side.jsonl", [{"id": "s", "filter": {"reasons": ["judge"]}}])
    report, _ = report_of("-", "--filtered", side, input=text)
    assert report["input"]["dropped_by_reason"] == {"judge": 1}


def test_length_percentiles(tmp_path):
    words = lambda n: " ".join(f"w{i}" for i in range(n))
    rows = [record(str(n), rejected=words(n), chosen=words(2 * n), prompt=words(3)) for n in (1, 2, 3, 4, 10)]
    report, _ = report_of(write(tmp_path / "pairs.jsonl", rows))
    # linear interpolation between the closest ranks (numpy's default)
    assert report["lengths"]["rejected"] == {"min": 1, "p10": 1.4, "p50": 3, "p90": 7.6, "max": 10, "mean": 4}
    assert report["lengths"]["chosen"] == {"min": 2, "p10": 2.8, "p50": 6, "p90": 15.2, "max": 20, "mean": 8}
    assert report["lengths"]["prompt"] == {"min": 3, "p10": 3, "p50": 3, "p90": 3, "max": 3, "mean": 3}


def test_edits_and_near_identical(tmp_path):
    ten = "a b c d e f g h i j"
    rows = [
        record("one-word", rejected=ten, chosen=ten.replace("e", "z")),          # 1 edit, ratio 18/20 = 0.9
        record("spaces", rejected="x  y\nz", chosen=" X, y z! "),                # identical: case, spacing, punctuation aside
        record("insert", rejected="a b c", chosen="a b c d e"),                   # 2 edits, ratio 6/8
        record("rewrite", rejected="x y", chosen="p q r"),                        # 3 edits, ratio 0
    ]
    report, _ = report_of(write(tmp_path / "pairs.jsonl", rows))
    edits = report["edits"]
    assert edits["near_identical"] == 2 and edits["identical"] == 1
    assert edits["word_edits"] == {"min": 0, "p10": 0.3, "p50": 1.5, "p90": 2.7, "max": 3, "mean": 1.5}
    assert edits["similarity"]["min"] == 0 and edits["similarity"]["max"] == 1
    assert edits["similarity"]["p50"] == pytest.approx(0.825)
    assert edits["similarity"]["mean"] == pytest.approx((0.9 + 1 + 0.75 + 0) / 4)


def test_judge_means_with_and_without_order_averaging(tmp_path):
    judged = [(0.05, 0.0, 0.1), (0.5, 0.4, 0.6), (0.64, 0.58, 0.70), (1.0, 1.0, 1.0), (0.95, 0.9, 1.0)]
    rows = [record(str(i), judge=j, principle="harm-1" if i < 2 else "harm-2") for i, j in enumerate(judged)]
    rows.append(record("unjudged", principle="harm-3"))
    rows[0]["judge"]["swapped"] = True      # preference stays P(revision better) after a swap
    report, _ = report_of(write(tmp_path / "pairs.jsonl", rows))
    judge = report["judge"]
    assert judge["judged"] == 5
    assert judge["mean_preference"] == pytest.approx(3.14 / 5)
    assert judge["mean_revision_as_b"] == pytest.approx(2.88 / 5)     # orders[0] alone
    assert judge["mean_revision_as_a"] == pytest.approx(3.40 / 5)     # orders[1] alone
    assert judge["fraction_preferred"] == pytest.approx(0.6)           # 0.5 itself is not > 0.5
    assert judge["histogram"]["counts"] == [1, 0, 0, 0, 0, 1, 1, 0, 0, 2]   # 1.0 falls in the last bin
    assert judge["swapped"] == 1
    assert judge["histogram"]["edges"][0] == 0 and judge["histogram"]["edges"][-1] == 1
    assert len(judge["histogram"]["edges"]) == 11
    principles = report["principles"]
    assert principles["harm-1"]["judge_mean"] == pytest.approx(0.275)
    assert principles["harm-2"]["judge_mean"] == pytest.approx(2.59 / 3)
    assert principles["harm-3"]["judge_mean"] is None


def test_no_judge_section_without_judge(tmp_path):
    pairs = write(tmp_path / "pairs.jsonl", [record("a"), record("b")])
    report, _ = report_of(pairs)
    assert report["judge"] is None
    assert "judge: P(revision better)" not in run(pairs).stderr


def test_finish_reasons_and_cleaned(tmp_path):
    rows = [
        record("a", response="stop", revision=("stop",), cleaned=["preamble: Here is the revised response:"]),
        record("b", response="length", revision=("stop", "length")),       # the final revision counts
        record("c", response="stop", revision=("length", "stop"), cleaned=["quotes"]),
        record("d", response="length", revision=("length",)),
    ]
    report, _ = report_of(write(tmp_path / "pairs.jsonl", rows))
    assert report["finish_reasons"] == {"response": {"stop": 2, "length": 2}, "revision": {"stop": 2, "length": 2}}
    rows[0]["meta"]["finish_reasons"]["revision"] = ["length"]
    report, _ = report_of(write(tmp_path / "pairs.jsonl", rows))
    assert report["finish_reasons"]["revision"] == {"length": 3, "stop": 1}
    assert report["cleaned"] == 2


def test_conversational_input_gives_the_same_figures(tmp_path):
    rows = [record("a", rejected="one two three", chosen="one two four five", prompt="say it", judge=(0.7, 0.6, 0.8)),
            record("b", rejected="x y", chosen="x y", prompt="a b c d", principle="harm-2")]
    for r in rows:
        r["meta"]["system"] = "You are helpful."
    standard, _ = report_of(write(tmp_path / "standard.jsonl", rows))
    chat_rows = [to_format(r, "conversational") for r in rows]
    assert isinstance(chat_rows[0]["prompt"], list)
    chat, _ = report_of(write(tmp_path / "chat.jsonl", chat_rows))
    assert {**chat, "input": None} == {**standard, "input": None}
    assert chat["lengths"]["prompt"]["max"] == 4, "the user turn, not the system turn"


def test_full_dropped_records_in_conversational_shape(tmp_path):
    pairs = write(tmp_path / "pairs.jsonl", [record("a")])
    write(tmp_path / "pairs.jsonl.filtered.jsonl",
          [{**to_format(record("d", principle="harm-9"), "conversational"), "filter": {"reasons": ["repetitive"]}}])
    report, _ = report_of(pairs)
    assert report["principles"]["harm-9"] == {"kept": 0, "dropped": 1, "judge_mean": None}
    assert report["input"]["dropped_by_reason"] == {"repetitive": 1}


def test_torn_last_line_of_the_records_file(tmp_path):
    pairs = write(tmp_path / "pairs.jsonl", [record("a"), record("b")], tail='{"id": "c", "prompt": "p", "cho')
    report, result = report_of(pairs)
    assert report["input"]["kept"] == 2 and report["input"]["torn_lines"] == 1
    assert "pairs.jsonl:3: torn last line (no newline, not JSON); skipped" in result.stderr
    assert "Traceback" not in result.output


def test_malformed_lines_are_errors_with_file_and_line(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps(record("a")) + "\n{not json\n" + json.dumps(record("b")) + "\n")
    result = run(pairs)
    assert result.exit_code == 2
    assert "pairs.jsonl:2: not a whole JSON record" in result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1

    pairs.write_text(json.dumps(record("a")) + "\n" + json.dumps({"id": "s", "filter": {"reasons": ["meta"]}}) + "\n")
    result = run(pairs)
    assert result.exit_code == 2 and "pairs.jsonl:2: prompt: missing" in result.stderr

    pairs.write_text(json.dumps(record("a")) + "\n[1, 2]\n")
    result = run(pairs)
    assert result.exit_code == 2 and "pairs.jsonl:2: expected a JSON object" in result.stderr

    write(pairs, [record("a")])
    side = tmp_path / "pairs.jsonl.filtered.jsonl"
    side.write_text('{"id": "s", "filter": {"reasons": ["meta"]}}\n{"id": "t", "fil\n{"id": "u"}\n')
    result = run(pairs)
    assert result.exit_code == 2 and "pairs.jsonl.filtered.jsonl:2: not a whole JSON record" in result.stderr


def test_missing_input_file(tmp_path):
    result = run(tmp_path / "nope.jsonl")
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'nope.jsonl'}: no such file"


def test_json_goes_to_stdout_and_no_tables(tmp_path):
    pairs = write(tmp_path / "pairs.jsonl", [record("a", judge=(0.6, 0.5, 0.7))])
    report, result = report_of(pairs)
    assert set(report) == {"input", "principles", "lengths", "edits", "judge", "finish_reasons", "cleaned", "repairs",
                           "review", "runs", "feedback"}
    assert result.stderr == ""
    assert "┃" not in result.stdout and "cai stats" not in result.stdout


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    pairs = write(tmp_path / "pairs.jsonl", [record("a", rejected="a b c", chosen="a b d e", judge=(0.6, 0.5, 0.7)),
                                             record("b", rejected="x y z w", chosen="x y z w")])
    write(tmp_path / "pairs.jsonl.filtered.jsonl", [{"id": "s", "filter": {"reasons": ["meta"]}}])
    for name, extra in (("with-judge.png", []), ("nothing-dropped.png", ["--filtered", write(tmp_path / "empty.jsonl", [])])):
        target = tmp_path / name
        result = run(pairs, "--plot", target, *extra)
        assert result.exit_code == 0, result.output
        assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"wrote {target}" in result.stderr
    result = run(pairs, "--plot", tmp_path / "no-such-dir" / "x.png")
    assert result.exit_code == 2 and "cannot write" in result.stderr


def test_plot_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    pairs = write(tmp_path / "pairs.jsonl", [record("a")])
    result = run(pairs, "--plot", tmp_path / "x.png", "--json")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --plot: needs matplotlib (pip install 'cai[plot]')"
    assert result.stdout == "" and not (tmp_path / "x.png").exists()


def test_help_has_examples():
    result = CliRunner().invoke(app, ["stats", "--help"])
    assert result.exit_code == 0 and "Examples" in result.stdout and "--filtered" in result.stdout


def by_fixture(tmp_path):
    """Kept and dropped records over three principles of the harmless constitution."""
    kept = [record("a", principle="privacy", rejected="a b c d", chosen="a b x d", judge=(0.7, 0.8, 0.6)),
            record("b", principle="privacy", rejected="a b", chosen="a b", judge=(0.5, 0.7, 0.3)),
            record("c", principle="dangerous-instructions", rejected="one two", chosen="three four"),
            record("d", principle="harmful-content")]
    kept[0]["meta"]["edit"] = {"distance": 0.25, "spans": 1}          # as a run writes it; the others are computed
    pairs = write(tmp_path / "pairs.jsonl", kept)
    write(tmp_path / "pairs.jsonl.filtered.jsonl", [
        {"id": "e", "principle": "dangerous-instructions", "filter": {"reasons": ["unchanged"], "edit": {"distance": 0.0, "spans": 0}}},
        {"id": "f", "principle": "dangerous-instructions", "filter": {"reasons": ["copied", "meta"]}},
        {"id": "g", "principle": "harmful-content", "filter": {"reasons": ["truncated"]}},
        {"id": "h", "principle": "harmful-content", "filter": {"reasons": ["truncated"]}},
        {"id": "i", "principle": "harmful-content", "filter": {"reasons": ["truncated"]}}])
    return pairs


def test_by_principle_adds_up_and_puts_the_worst_first(tmp_path):
    report, result = report_of(by_fixture(tmp_path), "--by", "principle")
    by = report["by"]
    assert by["key"] == "principle" and by["totals"] == {"kept": 4, "dropped": 5}
    groups = by["groups"]
    assert [g["name"] for g in groups] == ["harmful-content", "dangerous-instructions", "privacy"]
    assert sum(g["kept"] for g in groups) == report["input"]["kept"]
    assert sum(g["dropped"] for g in groups) == report["input"]["dropped"]
    assert sum(g["total"] for g in groups) == report["input"]["kept"] + report["input"]["dropped"]
    worst, middle, best = groups
    assert (worst["kept"], worst["dropped"], worst["kept_rate"]) == (1, 3, 0.25)
    assert worst["dropped_by_reason"] == {"truncated": 3}
    assert middle["dropped_by_reason"] == {"unchanged": 1, "copied": 1, "meta": 1}
    assert middle["edit_distance_mean"] == 1 and best["edit_distance_mean"] == 0.125    # (0.25 + 0) / 2
    assert best["judged"] == 2 and best["judge_mean"] == 0.6 and best["agreement"] == 0.5
    assert worst["judge_mean"] is None and worst["agreement"] is None
    table = run(tmp_path / "pairs.jsonl", "--by", "principle").stderr.split("by principle")[1]
    assert table.index("harmful-content") < table.index("privacy")


def test_by_tag_from_the_named_or_the_records_constitution(tmp_path):
    pairs = by_fixture(tmp_path)
    report, _ = report_of(pairs, "--by", "tag")                  # meta.constitution names the shipped harmless
    by = report["by"]
    assert by["constitution"].startswith("harmless@") and by["overlapping"] is True
    rows = {g["name"]: g for g in by["groups"]}
    assert rows["harm"]["principles"] == ["dangerous-instructions", "harmful-content"]
    assert (rows["harm"]["kept"], rows["harm"]["dropped"]) == (2, 5)
    assert (rows["weapons"]["kept"], rows["weapons"]["dropped"]) == (1, 2)
    assert (rows["privacy"]["kept"], rows["privacy"]["dropped"]) == (2, 0)
    assert [g["name"] for g in by["groups"]][-1] == "privacy"
    named, _ = report_of(pairs, "--by", "tag", "-c", "minimal")      # none of its principles: all untagged
    assert [(g["name"], g["total"]) for g in named["by"]["groups"]] == [("(untagged)", 9)]


def test_by_tag_needs_a_known_constitution(tmp_path):
    rows = [record("a")]
    rows[0]["meta"]["constitution"] = "mine@123"
    result = run(write(tmp_path / "pairs.jsonl", rows), "--by", "tag")
    assert result.exit_code == 2 and "--constitution" in result.stderr and "mine@123" in result.stderr
    assert "--by" in run(tmp_path / "pairs.jsonl", "--by", "colour").stderr
    assert "--constitution: is for --by tag" in run(tmp_path / "pairs.jsonl", "-c", "harmless").stderr


def test_edit_size_and_judge_agreement(tmp_path):
    report, result = report_of(by_fixture(tmp_path))
    edits = report["edits"]
    assert edits["distance"]["max"] == 1 and edits["distance"]["min"] == 0 and edits["computed"] == 3
    assert edits["spans"]["max"] == 1
    assert edits["distance_dropped"] == {"min": 0, "p10": 0, "p50": 0, "p90": 0, "max": 0, "mean": 0}
    assert report["judge"]["agreement"] == 0.5 and report["judge"]["disagreeing"] == 1
    assert "orders agree" in " ".join(run(tmp_path / "pairs.jsonl").stderr.split())


def test_a_file_with_an_endless_line_is_one_error_not_all_memory(tmp_path):
    """Found trying issue 31's hostile files: `cai stats /dev/zero` (and judge, export) read one
    endless line until memory ran out."""
    from typer.testing import CliRunner

    from cai.cli import app

    for command in (["stats", "/dev/zero"], ["export", "/dev/zero", "-o", str(tmp_path / "x.jsonl")]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, result.output
        assert "/dev/zero:1: a line longer than 64 MiB" in result.stderr and "Traceback" not in result.output
