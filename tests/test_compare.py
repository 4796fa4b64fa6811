"""`cai compare`: two output files, and two constitutions / template sets run on the same prompts
(the library on ScriptedBackend; the CLI on the tiny model once)."""

from __future__ import annotations

import json

import pytest
from conftest import plumbing, read_jsonl
from cai.backends.scripted import ScriptedBackend
from typer.testing import CliRunner

import cai
from cai.cli import app
from cai.options import GenerateOptions
from cai.run.compare import compare_files, compare_runs, sides

PROMPTS = [f"q{i} how do I boil water" for i in range(8)]


def cli(*args):
    return CliRunner().invoke(app, plumbing(["compare", *args]))


def two_files(tmp_path):
    """The same prompts twice: side b's revisions of q1 and q2 repeat the response (dropped)."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    cai.generate(PROMPTS, str(a), model=ScriptedBackend(unchanged={"q3"}), judge=True, keep_filtered=True)
    cai.generate(PROMPTS, str(b), model=ScriptedBackend(unchanged={"q1", "q2"}), judge=True)
    return a, b


def test_compare_two_files(tmp_path):
    a, b = two_files(tmp_path)
    report = compare_files(str(a), str(b))
    left, right = report["sides"]
    assert (left["label"], right["label"]) == ("a", "b")
    assert (left["kept"], left["dropped"], right["kept"], right["dropped"]) == (7, 1, 6, 2)
    assert left["dropped_by_reason"] == {"unchanged": 1} and left["kept_rate"] == 0.875
    assert sum(p["kept"] for p in left["principles"]) == 7 and sum(p["total"] for p in right["principles"]) == 8
    assert left["edit"]["distance_mean"] == 1 and left["edit"]["distance_dropped_mean"] == 0
    assert left["judge"]["judged"] == 7 and left["judge"]["agreement"] == 0       # the scripted judge: orders disagree
    diff = report["differences"]
    assert diff["matched"] == 8 and diff["kept_both"] == 5 and diff["dropped_both"] == 0
    assert diff["kept_only_by"] == {"a": 2, "b": 1}
    shown = {e["kept_by"]: e for e in diff["examples"]}
    assert shown["a"]["a"]["kept"] and shown["a"]["a"]["chosen"] and shown["a"]["b"]["reasons"] == ["unchanged"]
    assert shown["a"]["b"]["chosen"] is None, "b kept no whole dropped records"
    assert shown["b"]["a"]["chosen"] is not None, "a's dropped record is whole (keep_filtered)"
    assert shown["a"]["prompt"].endswith("how do I boil water")
    assert compare_files(str(a), str(b), show=0)["differences"]["examples"] == []


def test_compare_two_files_on_the_command_line(tmp_path):
    a, b = two_files(tmp_path)
    result = cli(a, b, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [s["kept"] for s in report["sides"]] == [7, 6]
    text = " ".join(result.stderr.split())
    assert "kept only by a: 2" in text and "a: by principle" in text and "rejected:" in text
    quiet = cli(a, b, "-q", "--json")
    assert quiet.stderr == "" and json.loads(quiet.stdout) == report


def test_compare_file_mode_refuses_run_options(tmp_path):
    a, b = two_files(tmp_path)
    for args, flag in ((["--max-new-tokens", "9"], "--max-new-tokens"), (["-o", tmp_path / "x"], "--output"),
                       (["--judge"], "--judge")):
        result = cli(a, b, *args)
        assert result.exit_code == 2 and flag in result.stderr, (args, result.output)
    result = cli(a)
    assert result.exit_code == 2 and "two output files" in result.stderr


def test_compare_two_constitutions_runs_both_and_resumes(tmp_path):
    options = GenerateOptions(model=ScriptedBackend(unchanged={"q0"}), judge=True, max_new_tokens=16)
    folder = tmp_path / "runs"
    report = compare_runs(PROMPTS, options, ["harmless", "helpful-honest"], ["default"], str(folder))
    assert [r["label"] for r in report["runs"]] == ["harmless", "helpful-honest"]
    assert [r["made"] for r in report["runs"]] == [8, 8]
    harmless = read_jsonl(folder / "harmless.jsonl")
    assert harmless and all(r["meta"]["constitution"].startswith("harmless@") for r in harmless)
    assert all(r["meta"]["constitution"].startswith("helpful-honest@") for r in read_jsonl(folder / "helpful-honest.jsonl"))
    (dropped,) = read_jsonl(folder / "harmless.jsonl.filtered.jsonl")
    assert dropped["chosen"] and dropped["filter"]["reasons"] == ["unchanged"], "dropped pairs are kept whole"
    left, right = report["sides"]
    assert left["kept"] == right["kept"] == 7 and left["constitutions"][0].startswith("harmless@")
    assert {p["name"] for p in left["principles"]} <= {p.id for p in cai.load_constitution("harmless").principles}
    assert report["differences"]["matched"] == 8 and report["differences"]["kept_both"] == 7
    again = compare_runs(PROMPTS, options, ["harmless", "helpful-honest"], ["default"], str(folder))
    assert [r["resumed"] for r in again["runs"]] == [8, 8] and [r["made"] for r in again["runs"]] == [0, 0]
    assert again["sides"] == report["sides"]


def test_compare_two_template_sets_keeps_the_responses(tmp_path):
    # without worked examples (which each set words with its own revision request) the
    # conversations are the same up to the revision request
    options = GenerateOptions(model=ScriptedBackend(), max_new_tokens=16, seed=3, few_shot=False)
    report = compare_runs(PROMPTS[:4], options, ["harmless"], ["default", "minimal"], str(tmp_path / "runs"))
    assert [r["label"] for r in report["runs"]] == ["default", "minimal"]
    default, minimal = (read_jsonl(tmp_path / "runs" / f"{name}.jsonl") for name in ("default", "minimal"))
    assert [r["rejected"] for r in default] == [r["rejected"] for r in minimal], "same seed, same responses"
    assert [r["principle"] for r in default] == [r["principle"] for r in minimal]
    assert all(r["meta"]["templates"].startswith("minimal@") for r in minimal)


def test_side_labels():
    assert [s[0] for s in sides(["harmless", "my/rules.yaml"], ["default"])] == ["harmless", "rules"]
    assert [s[0] for s in sides(["harmless"], ["default", "minimal"])] == ["default", "minimal"]
    assert [s[0] for s in sides(["a.yaml", "b.yaml"], ["x", "y"])] == ["a+x", "b+y"]
    assert [s[0] for s in sides(["one/my.yaml", "two/my.yaml"], ["default"])] == ["a-my", "b-my"]
    with pytest.raises(cai.OptionError, match="the same"):
        sides(["harmless", "harmless"], ["default"])
    with pytest.raises(cai.OptionError, match="two sides"):
        sides(["harmless"], ["default"])


def test_cli_compares_two_constitutions_on_the_tiny_model(tiny_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("How do I boil an egg?\nName a colour.\n")
    folder = tmp_path / "runs"
    args = ["-c", "harmless", "-c", "minimal", prompts, "-o", folder, "--model", tiny_model, "--max-new-tokens", 4,
            "--json", "--plot", tmp_path / "cmp.png"]
    pytest.importorskip("matplotlib")
    result = cli(*args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [s["label"] for s in report["sides"]] == ["harmless", "minimal"]
    assert [s["total"] for s in report["sides"]] == [2, 2]
    assert (folder / "harmless.jsonl").exists() and (folder / "minimal.jsonl").exists()
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    assert "already made" in cli(*args).stderr, "a rerun resumes both runs"
    result = cli("-c", "harmless", "-c", "minimal", prompts, "--model", tiny_model)
    assert result.exit_code == 2 and "--output" in result.stderr


def test_the_python_api(tmp_path):
    a, b = two_files(tmp_path)
    assert cai.compare(str(a), str(b))["differences"]["kept_only_by"] == {"a": 2, "b": 1}
    report = cai.compare(PROMPTS[:3], constitution=["harmless", "minimal"], output=str(tmp_path / "runs"),
                         model=ScriptedBackend(), max_new_tokens=16)
    assert [s["label"] for s in report["sides"]] == ["harmless", "minimal"] and report["sides"][1]["made"] == 3
    with pytest.raises(cai.OptionError, match="output"):
        cai.compare(PROMPTS, constitution=["harmless", "minimal"], model=ScriptedBackend())
    with pytest.raises(cai.OptionError, match="two files"):
        cai.compare(str(a), str(b), max_new_tokens=3)
