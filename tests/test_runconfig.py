"""One declaration per option, and a run as a file: `--print-config` writes the effective
configuration, `--config` reads it back (flags win), bad files are `file:line: key: problem`;
records carry `meta.config`, the hash of what decides them."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml
from typer.testing import CliRunner

from cai.cli import app
from cai.declare import flags
from cai.options import GenerateOptions, JudgeOptions, PreviewOptions
from conftest import ROOT, plumbing, read_jsonl

EXAMPLES = ROOT / "examples" / "prompts.jsonl"
FAST = ["--max-new-tokens", "6", "--batch-size", "4", "--no-filter", "--temperature", "0"]


def run(*args, input: str | None = None):
    return CliRunner().invoke(app, plumbing(args), input=input)


def _help_flags(*command: str) -> set[str]:
    text = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "400"}, terminal_width=400).output
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", text))


def _strip(records):
    for r in records:
        r["meta"].pop("created", None)
    return sorted(records, key=lambda r: r["id"])


@pytest.mark.parametrize("command,cls,own", [
    ("generate", GenerateOptions, {"--output", "--quiet", "--config", "--print-config"}),
    ("judge", JudgeOptions, {"--output", "--quiet", "--config", "--print-config"}),
    ("preview", PreviewOptions, {"--json"}),
])
def test_every_option_on_the_command_line_is_declared_once_in_its_dataclass(command, cls, own):
    declared = {flag.long for flag in flags(cls).values()}
    declared |= {"--no-" + f.long[2:] for f in flags(cls).values() if "/" in f.flags[0]}
    offered = _help_flags(command) - {"--help"}
    undeclared = offered - declared - own
    assert undeclared == set(), f"{command} offers flags no dataclass field declares: {undeclared}"


def test_every_declared_option_has_help_and_a_type_typer_can_parse():
    for cls in (GenerateOptions, JudgeOptions, PreviewOptions):
        for name, flag in flags(cls).items():
            assert flag.help.strip() and flag.flags, name
            assert all(f.startswith("-") for f in flag.flags[0].split("/")), name


def test_print_config_then_config_repeats_the_run(tiny_model, tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    args = ["generate", EXAMPLES, "--model", tiny_model, "-o", first, "--seed", "3", "--revisions", "2", *FAST]
    printed = run(*args, "--print-config")
    assert printed.exit_code == 0, printed.output
    assert not first.exists(), "--print-config runs nothing"
    config = yaml.safe_load(printed.stdout)
    assert config["seed"] == 3 and config["revisions"] == 2 and config["max_new_tokens"] == 6
    assert config["filter"] is False and config["lock"] is True and config["prompts"] == str(EXAMPLES)
    assert set(config) >= {f.name for f in dataclasses.fields(GenerateOptions) if f.metadata.get("flag")}
    config["output"] = str(second)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert run(*args).exit_code == 0
    again = run("generate", "--config", path)
    assert again.exit_code == 0, again.output
    a, b = _strip(read_jsonl(first)), _strip(read_jsonl(second))
    assert a == b and len(a) == len(EXAMPLES.read_text().splitlines())
    assert {r["meta"]["config"] for r in a} == {a[0]["meta"]["config"]} and re.fullmatch(r"[0-9a-f]{12}", a[0]["meta"]["config"])


def test_flags_on_the_command_line_win_over_the_file(tiny_model, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"prompts: {EXAMPLES}\nmodel: {tiny_model}\nmax-new-tokens: 6\nseed: 1\nfilter: false\n"
                    f"temperature: 0\noutput: {tmp_path / 'file.jsonl'}\n")
    printed = run("generate", "--config", path, "--seed", "2", "-o", tmp_path / "cli.jsonl", "--print-config")
    assert printed.exit_code == 0, printed.output
    config = yaml.safe_load(printed.stdout)
    assert config["seed"] == 2 and config["max_new_tokens"] == 6 and config["output"] == str(tmp_path / "cli.jsonl")
    assert config["model"] == str(tiny_model) and config["filter"] is False


def test_meta_config_follows_what_decides_the_records(tiny_model, tmp_path):
    outs = {}
    for name, extra in {"b2": ["--batch-size", "2"], "b4": [], "seed": ["--seed", "9"]}.items():
        outs[name] = tmp_path / f"{name}.jsonl"
        result = run("generate", EXAMPLES, "--model", tiny_model, "-o", outs[name], *FAST, *extra)
        assert result.exit_code == 0, result.output
    hashes = {name: {r["meta"]["config"] for r in read_jsonl(out)} for name, out in outs.items()}
    assert hashes["b2"] == hashes["b4"] and len(hashes["b2"]) == 1     # batch size decides nothing
    assert hashes["seed"] != hashes["b4"]


@pytest.mark.parametrize("text,line,message", [
    ("seed: 1\nmax_new_token: 8\n", 2, "max_new_token: unknown option; did you mean 'max_new_tokens'?"),
    ("seed: one\n", 1, "seed: expected an integer, got str 'one'"),
    ("temperature: .nan\n", 1, "temperature: expected a number, got NaN"),
    ("format: jsonl\n", 1, "format: unknown value 'jsonl'; choose from standard, conversational"),
    ("seed: 1\nseed: 2\n", 2, "seed: given twice (first at line 1)"),
    ("seed: {a: 1}\n", 1, "seed: expected a value or a list, got a mapping"),
    ("- seed\n", 1, "expected a mapping of option: value"),
    ("seed: [1\n", None, "YAML syntax error"),
    ("device: gpu\n", 1, "device: unknown value 'gpu'; choose from auto, cpu, cuda, mps"),
])
def test_a_bad_config_is_one_line_naming_file_line_and_key(tmp_path, text, line, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    result = run("generate", EXAMPLES, "--config", path, "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 2, result.output
    error = result.output.strip().splitlines()
    assert len(error) == 1 and "Traceback" not in result.output, result.output
    where = f"{path}:{line}:" if line else f"{path}"
    assert where in error[0] and message in error[0], error[0]
    assert not (tmp_path / "out.jsonl").exists()


def test_a_missing_config_file_and_missing_prompts_are_one_line(tmp_path):
    result = run("generate", "--config", tmp_path / "nope.yaml")
    assert result.exit_code == 2 and "nope.yaml: no such file" in result.output
    result = run("generate")
    assert result.exit_code == 2 and "--prompts: missing" in result.output


def test_a_backend_option_given_to_another_backend_is_refused(tmp_path):
    result = run("generate", EXAMPLES, "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "--model", "m",
                 "--dtype", "bfloat16", "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 2 and "--dtype: is for --backend hf" in result.output, result.output
    result = run("generate", EXAMPLES, "--concurrency", "4", "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 2 and "--concurrency: is for --backend openai" in result.output, result.output


def test_judge_takes_a_config_too(tmp_path):
    path = tmp_path / "judge.yaml"
    path.write_text("pairs: pairs.jsonl\nmin-preference: 0.6\nclamp: 0.4,0.6\n")
    printed = run("judge", "--config", path, "--print-config")
    assert printed.exit_code == 0, printed.output
    config = yaml.safe_load(printed.stdout)
    assert config["pairs"] == "pairs.jsonl" and config["min_preference"] == 0.6 and config["clamp"] == "0.4,0.6"
    path.write_text("pairs: pairs.jsonl\nsimilarity: 0.5\n")           # not an option of judge
    result = run("judge", "--config", path)
    assert result.exit_code == 2 and f"{path}:2: similarity" in result.output, result.output
