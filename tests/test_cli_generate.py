"""End-to-end: the real CLI on the tiny model, records read back and checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from cai.cli import app
from conftest import DATA, ROOT, default_model_name, plumbing, read_jsonl

EXAMPLES = ROOT / "examples" / "prompts.jsonl"
FAST = ["--max-new-tokens", "6", "--batch-size", "4", "--no-filter"]


def run(*args, input: str | None = None):
    return CliRunner().invoke(app, plumbing(args), input=input)


def test_generate_writes_one_record_per_prompt(tiny_model, tmp_path):
    out = tmp_path / "pairs.jsonl"
    result = run("generate", EXAMPLES, "--model", tiny_model, "-o", out, *FAST)
    assert result.exit_code == 0, result.output
    records = read_jsonl(out)
    source = [json.loads(line) for line in EXAMPLES.read_text().splitlines()]
    # records come out as their conversations finish (continuous batching), not in input order
    assert sorted(r["id"] for r in records) == sorted(s["id"] for s in source)
    prompts = {s["id"]: s["prompt"] for s in source}
    for r in records:
        assert r["prompt"] == prompts[r["id"]]
        assert set(r) == {"id", "prompt", "chosen", "rejected", "principle", "critique", "rounds", "meta"}
        assert isinstance(r["chosen"], str) and isinstance(r["rejected"], str)
        assert len(r["rounds"]) == 1
        assert r["rounds"][0]["revision"] == r["chosen"]
        assert r["rounds"][0]["principle"] == r["principle"]
        meta = r["meta"]
        assert meta["model"] == default_model_name(tiny_model)
        assert meta["constitution"].startswith("harmless@")
        assert meta["params"]["max_new_tokens"] == 6
        assert meta["finish_reasons"]["response"] in ("stop", "length")
        assert meta["tokens"]["completion"] > 0
    assert result.stdout == "", "records went to the file, so stdout must stay empty"
    assert "records written" in result.stderr


@pytest.mark.slow
def test_stdout_carries_only_json_lines(tiny_model):
    """A real pipe: every stdout line parses, while progress and summary go to stderr."""
    env = {**os.environ, "COLUMNS": "100"}
    proc = subprocess.run(
        [sys.executable, "-m", "cai", "generate", str(EXAMPLES), "--model", str(tiny_model), "-o", "-",
         "--limit", "3", *FAST], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 3
    assert all(json.loads(line)["id"].startswith("ex-") for line in lines)
    assert "records written" in proc.stderr


def test_same_seed_same_records(tiny_model, tmp_path):
    outs = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        out = tmp_path / f"{name}.jsonl"
        result = run("generate", EXAMPLES, "--model", tiny_model, "-o", out, "--seed", seed, *FAST)
        assert result.exit_code == 0, result.output
        outs.append([{k: v for k, v in r.items() if k != "meta"} for r in read_jsonl(out)])
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]


def test_revisions_use_distinct_principles(tiny_model, tmp_path):
    out = tmp_path / "pairs.jsonl"
    result = run("generate", EXAMPLES, "--model", tiny_model, "-o", out, "--revisions", "3", "--limit", "2", *FAST)
    assert result.exit_code == 0, result.output
    for r in read_jsonl(out):
        principles = [rnd["principle"] for rnd in r["rounds"]]
        assert len(principles) == 3 and len(set(principles)) == 3
        assert r["chosen"] == r["rounds"][-1]["revision"]
        assert len(r["meta"]["finish_reasons"]["revision"]) == 3


def test_sampling_all_makes_one_record_per_principle(tiny_model, tmp_path):
    out = tmp_path / "pairs.jsonl"
    result = run("generate", EXAMPLES, "--model", tiny_model, "-o", out, "--limit", "2",
                 "--constitution", DATA / "three.yaml", "--sampling", "all", *FAST)
    assert result.exit_code == 0, result.output
    records = read_jsonl(out)
    assert len(records) == 6
    assert {r["id"] for r in records} == {f"{p}/{q}" for p in ("ex-lockpick", "ex-bread")
                                          for q in ("be-kind", "be-safe", "be-brief")}


def test_text_prompts_from_stdin(tiny_model, tmp_path):
    out = tmp_path / "pairs.jsonl"
    result = run("generate", "-", "--model", tiny_model, "-o", out, *FAST,
                 input="How are you?\n\nTell me a story.\n")
    assert result.exit_code == 0, result.output
    records = read_jsonl(out)
    assert [r["prompt"] for r in records] == ["How are you?", "Tell me a story."]
    assert len({r["id"] for r in records}) == 2


def test_rerun_resumes_and_a_changed_config_is_refused(tiny_model, tmp_path):
    out = tmp_path / "pairs.jsonl"
    assert run("generate", EXAMPLES, "--model", tiny_model, "-o", out, "--limit", "3", *FAST).exit_code == 0
    first = read_jsonl(out)
    before = out.read_bytes()
    refused = run("generate", EXAMPLES, "--model", tiny_model, "-o", out, "--seed", "9", *FAST)
    assert refused.exit_code == 2
    assert "holds records of a different run (seed: 0 → 9)" in refused.stderr
    assert out.read_bytes() == before, "a refused run must leave the file untouched"
    resumed = run("generate", EXAMPLES, "--model", tiny_model, "-o", out, *FAST)
    assert resumed.exit_code == 0, resumed.output
    assert "resuming" in resumed.stderr and "3 records already there" in resumed.stderr
    records = read_jsonl(out)
    assert records[:3] == first
    assert len(records) == 8 and len({r["id"] for r in records}) == 8
    again = run("generate", EXAMPLES, "--model", tiny_model, "-o", out, "--resume", *FAST)
    assert again.exit_code == 0 and read_jsonl(out) == records
    # a finished run is known as finished before any model is loaded
    assert "nothing to do: every record of this run is already in" in " ".join(again.stderr.split())
    assert "loaded" not in again.stderr


def test_force_appends_to_a_different_run_and_overwrite_replaces(tiny_model, tmp_path):
    out = tmp_path / "pairs.jsonl"
    assert run("generate", EXAMPLES, "--model", tiny_model, "-o", out, "--limit", "2", *FAST).exit_code == 0
    forced = run("generate", EXAMPLES, "--model", tiny_model, "-o", out, "--limit", "3", "--seed", "5", "--force", *FAST)
    assert forced.exit_code == 0, forced.output
    records = read_jsonl(out)
    assert [r["meta"]["seed"] for r in records] == [0, 0, 5]
    replaced = run("generate", EXAMPLES, "--model", tiny_model, "-o", out, "--limit", "1", "--overwrite", *FAST)
    assert replaced.exit_code == 0
    assert len(read_jsonl(out)) == 1


def test_resume_cuts_a_torn_last_line(tiny_model, tmp_path):
    out = tmp_path / "pairs.jsonl"
    assert run("generate", EXAMPLES, "--model", tiny_model, "-o", out, "--limit", "2", *FAST).exit_code == 0
    with out.open("a") as fp:
        fp.write('{"id": "ex-insult", "prompt": "Wri')
    result = run("generate", EXAMPLES, "--model", tiny_model, "-o", out, "--limit", "3", "--resume", *FAST)
    assert result.exit_code == 0, result.output
    assert [r["id"] for r in read_jsonl(out)] == ["ex-lockpick", "ex-bread", "ex-insult"]


@pytest.mark.parametrize("args, message", [
    (["--constitution", DATA / "bad_key.yaml"], "bad_key.yaml:8:5: principles[1].critque: unknown key; did you mean 'critique'?"),
    (["--constitution", "harmles"], "did you mean 'harmless'?"),
    (["--model", "./no/such/model"], "./no/such/model: no such model folder"),
    (["--prompt-field", "question"], "prompts.jsonl:1: question: missing"),
    (["--resume", "-o", "-"], "--resume: needs an output file"),
    (["--top-p", "0"], "--top-p: must be greater than 0"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_model, args, message):
    result = run("generate", EXAMPLES, "--model", tiny_model, *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == ""


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "fine"}\n{"prompt": "broken\n', "prompts.jsonl:2: invalid JSON"),
    ('{"prompt": "fine"}\n{"prompt": "   "}\n', "prompts.jsonl:2: prompt: empty prompt"),
    ('{"prompt": 3}\n', "prompts.jsonl:1: prompt: expected a string or a list of chat messages, got int"),
    ('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n', "prompts.jsonl:2: id: duplicate id 'a' (first on line 1)"),
    ('[1, 2]\n', "prompts.jsonl:1: expected a JSON object, got list"),
])
def test_bad_prompt_files(tiny_model, tmp_path, content, message):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(content)
    out = tmp_path / "out.jsonl"
    result = run("generate", prompts, "--model", tiny_model, "-o", out)
    assert result.exit_code == 2
    assert message in result.stderr
    assert not out.exists(), "input is checked before the output is opened"


def test_non_utf8_prompts(tiny_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"fine\ncaf\xe9\n")
    result = run("generate", prompts, "--model", tiny_model)
    assert result.exit_code == 2
    assert "prompts.txt:2: not valid UTF-8 text" in result.stderr


def _commands(group=None, path=()) -> list[tuple[str, ...]]:
    """Every command and group of `cai`, as the words that name it ((), ("generate",), …)."""
    import typer.main

    group = group or typer.main.get_command(app)
    found = [path]
    for name, command in getattr(group, "commands", {}).items():
        found += _commands(command, (*path, name))
    return found


COMMANDS = _commands()


def test_every_command_is_in_the_help_test():
    """A command added later is picked up by test_help on its own; this list says which exist."""
    assert set(COMMANDS) == {(), ("generate",), ("preview",), ("judge",), ("compare",), ("stats",), ("merge",),
                             ("export",), ("review",), ("constitution",), ("constitution", "list"),
                             ("constitution", "show"), ("constitution", "validate"), ("constitution", "schema"),
                             ("constitution", "init")}


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "cai")
def test_help(command):
    """`--help` (and `-h`) of every command: exit 0, its usage and every option it takes on
    stdout, nothing else (no model loaded, no record, nothing on stderr)."""
    import typer.main

    click_command = typer.main.get_command(app)
    for name in command:
        click_command = click_command.commands[name]
    for flag in ("--help", "-h"):
        result = CliRunner().invoke(app, [*command, flag], env={"COLUMNS": "300"}, terminal_width=300)
        assert result.exit_code == 0, result.output
        assert result.stderr == ""
        lines = [line for line in result.stdout.splitlines() if line.strip()]
        assert lines[0].strip().startswith(f"Usage: {' '.join(('cai', *command))} "), lines[0]
        assert not any(line.lstrip().startswith("{") for line in lines), "a record on stdout"
        for param in click_command.params:
            if getattr(param, "hidden", False) or param.param_type_name != "option":
                continue
            shown = [f for f in (*param.opts, *param.secondary_opts) if f.startswith("--")]
            assert any(f in result.stdout for f in shown), f"{' '.join(command)} --help does not show {shown}"
        assert "--help" in result.stdout
        for name in getattr(click_command, "commands", {}):
            assert name in result.stdout, f"{' '.join(command)} --help does not list {name}"
    if command in ((), ("generate",), ("review",)):
        assert "Examples" in result.stdout


@pytest.mark.slow
def test_closed_pipe_stops_quietly(tiny_model):
    """`cai generate … -o - | head -n 2`: no traceback when head goes away."""
    command = (f"{sys.executable} -m cai generate {EXAMPLES} --model {tiny_model} -o - "
               f"--max-new-tokens 6 --batch-size 4 --no-filter | head -n 2")
    proc = subprocess.run(["bash", "-c", f"set -o pipefail; {command}"], capture_output=True, text=True, timeout=300)
    assert len(proc.stdout.splitlines()) == 2
    assert all(json.loads(line) for line in proc.stdout.splitlines())
    assert "Traceback" not in proc.stderr and "Error" not in proc.stderr, proc.stderr
    assert proc.returncode == 141


def _content(path) -> dict:
    """Records by id, all fields but meta.created."""
    return {r["id"]: {**r, "meta": {k: v for k, v in r["meta"].items() if k != "created"}} for r in read_jsonl(path)}


@pytest.mark.parametrize("sampling", ["random", "cycle"])
def test_two_shards_merged_equal_one_unsharded_run(tiny_model, tmp_path, sampling):
    whole, one, two, merged = (tmp_path / f"{n}.jsonl" for n in ("whole", "one", "two", "merged"))
    for out, extra in ((whole, []), (one, ["--shard", "1/2"]), (two, ["--shard", "2/2"])):
        result = run("generate", EXAMPLES, "--model", tiny_model, "-o", out, "--sampling", sampling, *FAST, *extra)
        assert result.exit_code == 0, result.output
    ones, twos = {r["id"] for r in read_jsonl(one)}, {r["id"] for r in read_jsonl(two)}
    assert ones and twos and not ones & twos
    result = run("merge", merged, one, two)
    assert result.exit_code == 0, result.output
    assert _content(merged) == _content(whole), "record for record, not just the ids"
    assert "8 records, 0 duplicate ids dropped, 0 torn and 0 foreign lines" in result.output


def test_merge_conflict_exits_1_listing_both_places(tiny_model, tmp_path):
    out = tmp_path / "pairs.jsonl"
    assert run("generate", EXAMPLES, "--model", tiny_model, "-o", out, "--limit", "2", *FAST).exit_code == 0
    lines = out.read_text().splitlines(keepends=True)
    changed = json.loads(lines[0])
    changed["chosen"] += " (edited)"
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps(changed) + "\n")
    merged = tmp_path / "merged.jsonl"
    result = run("merge", merged, out, other)
    assert result.exit_code == 1 and not merged.exists()
    assert f"{out}:1 and {other}:1 differ" in " ".join(result.stderr.split())
    result = run("merge", merged, out, other, "--on-conflict", "last")
    assert result.exit_code == 0 and "1 conflicts (kept the last)" in result.stderr
    assert read_jsonl(merged)[0]["chosen"].endswith("(edited)")


def test_merge_drops_duplicates_and_reports_torn_and_foreign_lines(tiny_model, tmp_path):
    out = tmp_path / "pairs.jsonl"
    assert run("generate", EXAMPLES, "--model", tiny_model, "-o", out, "--limit", "3", *FAST).exit_code == 0
    lines = out.read_text().splitlines(keepends=True)
    other = json.loads(lines[0])
    other["id"], other["meta"]["seed"] = "x-other", 99
    extra = tmp_path / "extra.jsonl"
    extra.write_text(lines[0] + '{"hello": 1}\n' + json.dumps(other) + "\n" + lines[1][:30])
    merged = tmp_path / "merged.jsonl"
    result = run("merge", merged, out, extra)
    assert result.exit_code == 0, result.output
    assert [json.loads(l)["id"] for l in merged.read_text().splitlines()] == [json.loads(l)["id"] for l in lines]
    assert "3 records, 1 duplicate ids dropped, 1 torn and 2 foreign lines" in result.output
    assert f"{extra}:2: not a cai record" in result.output
    assert f"{extra}:3: a record of a different run (seed: 0 → 99)" in result.output
    assert f"{extra}:4: torn" in result.output
    assert run("merge", merged, out).exit_code == 2           # exists: needs --overwrite
    assert run("merge", merged, out, "--overwrite").exit_code == 0


def test_shard_option_is_checked(tiny_model):
    result = run("generate", EXAMPLES, "--model", tiny_model, "--shard", "3/2")
    assert result.exit_code == 2 and "--shard: K must be between 1 and N" in result.output
    result = run("generate", EXAMPLES, "--model", tiny_model, "--shard", "two")
    assert result.exit_code == 2 and "expected K/N" in result.output


def test_pairs_dropped_with_output_to_stdout_are_named_on_stderr(tiny_model):
    """Issue 31: with `-o -` the filters' dropped pairs were counted but listed nowhere."""
    result = run("generate", EXAMPLES, "--model", tiny_model, "-o", "-", "-n", "3", "--max-new-tokens", "4",
                 "--filter", "--repairs", "0")
    assert result.exit_code == 0, result.output
    kept = [json.loads(line) for line in result.stdout.splitlines()]
    stderr = " ".join(result.stderr.split())
    named = [line for line in result.stderr.splitlines() if line.startswith("warning: dropped: ")]
    assert len(kept) + len(named) == 3 and named, "the tiny model's 4-token answers are dropped as truncated"
    assert all(line.endswith("truncated") or "truncated" in line for line in named)
    assert (f"{len(named)} dropped pairs are listed nowhere: the output is stdout; a filtered file "
            "(--filtered FILE) keeps them") in stderr


# ---- issue 31: --input-format, and field options plain text cannot have ----

def test_input_format_says_what_stdin_holds_for_generate_preview_and_compare(tiny_model, tmp_path):
    table = "prompt,id\nHello there,1\nWrite a poem,2\n"
    out = tmp_path / "pairs.jsonl"
    result = run("generate", "-", "--input-format", "csv", "--model", tiny_model, "-o", out, "--max-new-tokens", "4",
                 input=table)
    assert result.exit_code == 0, result.output
    assert sorted((r["id"], r["prompt"]) for r in read_jsonl(out)) == [("1", "Hello there"), ("2", "Write a poem")]
    # without it the header is a prompt, as before; a field option on that text is refused, not ignored
    text = run("generate", "-", "--prompt-field", "question", "--model", tiny_model, "-o", tmp_path / "t.jsonl",
               input=table)
    assert text.exit_code == 2 and "Traceback" not in text.output and not (tmp_path / "t.jsonl").exists()
    assert text.stderr.strip().splitlines() == [
        "error: --prompt-field: does not apply to <stdin>: it is read as plain text, one prompt a line, with no "
        "fields (its first line does not start with '{'); if it is JSONL, CSV or TSV, say so with --input-format"]
    shown = run("preview", "-", "--input-format", "csv", "-n", "2", "--model", tiny_model, "--json",
                "--max-new-tokens", "2", input=table)
    assert shown.exit_code == 0, shown.output
    assert [json.loads(line)["id"] for line in shown.stdout.splitlines()] == ["1", "2"]
    refused = run("preview", "Hello there", "--input-format", "csv", "--model", tiny_model)
    assert refused.exit_code == 2
    assert refused.stderr.strip() == "error: --input-format: is for a prompts file or stdin, not a prompt given as the argument"
    # compare runs generate's runs, its options borrowed: --input-format included
    odd = tmp_path / "prompts.data"
    odd.write_text(table)
    compared = run("compare", odd, "-c", "harmless", "-c", "minimal", "-o", tmp_path / "runs", "--input-format", "csv",
                   "--model", tiny_model, "--max-new-tokens", "2", "--no-filter", "--json", "-q")
    assert compared.exit_code == 0, compared.output
    runs = sorted((tmp_path / "runs").glob("*.jsonl"))
    assert runs and all(sorted(r["id"] for r in read_jsonl(p)) == ["1", "2"] for p in runs
                        if not p.name.endswith((".filtered.jsonl", ".skipped.jsonl", ".failures.jsonl", ".runs.jsonl")))


def test_a_turn_budget_past_the_context_is_one_option_error(tiny_model, tmp_path):
    """Found trying issue 31 as a new user: --max-new-tokens past the context skipped every
    prompt 'as too long' with a hint about the prompts (--truncate-long); a huge --revisions
    spent minutes drawing principles. Both are now one line naming the option."""
    out = tmp_path / "out.jsonl"
    result = run("generate", EXAMPLES, "--model", tiny_model, "-o", out, "--max-new-tokens", "99999")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: --max-new-tokens: 99999 new tokens for each of a conversation's 3 turns need more than the "
        "model's context of 4096 tokens; at most about")
    assert not out.exists() or out.read_text() == ""
    many = run("generate", EXAMPLES, "--model", tiny_model, "-o", out, "--max-new-tokens", "64", "--revisions", "60")
    assert many.exit_code == 2 and "for each of a conversation's 121 turns" in many.stderr
    assert "fewer revisions would fit" in many.stderr
    capped = run("generate", EXAMPLES, "--model", tiny_model, "-o", out, "--revisions", "1000")
    assert capped.exit_code == 2 and "error: --revisions: must be at most 100 (got 1000)" in capped.stderr


def test_the_scripted_backend_runs_a_pipeline_with_no_model(tmp_path):
    """`--backend scripted` (cai/backends/scripted.py): the whole run, records and all, in
    milliseconds, for trying a constitution, templates or a downstream pipeline."""
    out = tmp_path / "pairs.jsonl"
    result = run("generate", EXAMPLES, "--backend", "scripted", "-o", out, "--format", "conversational")
    assert result.exit_code == 0, result.output
    records = read_jsonl(out)
    assert len(records) == len(EXAMPLES.read_text().splitlines())
    assert {r["meta"]["model"] for r in records} == {"scripted"}
    assert all(r["chosen"][-1]["content"].startswith("Heat the kettle") for r in records)
    again = run("generate", EXAMPLES, "--backend", "scripted", "-o", out, "--format", "conversational")
    assert again.exit_code == 0 and len(read_jsonl(out)) == len(records)      # resumed: nothing to do
