"""The public Python API: the snippet of docs/api.md runs as written (on the tiny model), `cai`
exports what `__all__` says, and the CLI's options are the API's keyword arguments."""

from __future__ import annotations

import re
from dataclasses import fields
import shutil

import pytest
from typer.testing import CliRunner

import cai
from cai.cli import app
from conftest import ROOT, read_jsonl


def doc_section(page: str, title: str | None = None) -> str:
    """A page of docs/ (where the README's sections moved), or its `## title` section."""
    text = (ROOT / "docs" / page).read_text(encoding="utf-8")
    if title is None:
        return text
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_the_api_page_snippet_runs(tiny_model, tmp_path, monkeypatch, capsys):
    snippets = re.findall(r"```python\n(.*?)```", doc_section("api.md"), re.S)
    assert len(snippets) == 1, "every Python snippet of docs/api.md runs here"
    code = snippets[0]
    assert 'model="smollm2-135m-instruct"' in code
    (tmp_path / "examples").mkdir()
    shutil.copy(ROOT / "examples" / "prompts.jsonl", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    # the tiny model, and fewer new tokens than the page's (its random text is not what is checked)
    assert code.count("max_new_tokens=32") == 2
    code = code.replace("smollm2-135m-instruct", str(tiny_model)).replace("max_new_tokens=32", "max_new_tokens=8")
    exec(compile(code, "docs/api.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 + 1 + 1                         # two records, the counts, the preferences
    assert printed[2] == "4 0 0 0 0"
    assert len(read_jsonl(tmp_path / "pairs.jsonl")) == 4
    assert isinstance(read_jsonl(tmp_path / "pairs.chat.jsonl")[0]["prompt"], list)


def test_all_names_resolve_and_import_is_light():
    import subprocess
    import sys

    for name in cai.__all__:
        assert getattr(cai, name) is not None, name
    probe = "import cai, sys; cai.generate; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def _help_flags(command: str) -> set[str]:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "400"}, terminal_width=400)
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", result.output))
    return flags - {"--help"}


def _documented_flags() -> set[str]:
    table = doc_section("commands/generate.md", "`cai generate` options")
    first_cells = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", " ".join(first_cells)))


def test_generate_option_table_matches_help():
    documented, offered = _documented_flags(), _help_flags("generate")
    assert documented - offered == set(), "in docs/commands/generate.md but not in --help"
    assert offered - documented - {"--few-shot", "--filter"} == set(), "in --help but not in docs/commands/generate.md's table"


def test_generate_option_table_defaults_are_the_declared_ones():
    """Where the table names a default for one option, it is the dataclass field's."""
    from cai.declare import flags
    from cai.options import GenerateOptions

    table = doc_section("commands/generate.md", "`cai generate` options")
    by_flag = {flag.long: name for name, flag in flags(GenerateOptions).items()}
    defaults = {f.name: f.default for f in fields(GenerateOptions)}
    checked = 0
    for line in table.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.split("|")[1:-1]]
        named = re.findall(r"(--[a-z][a-z0-9-]*)", cells[0])
        if len(named) != 1 or named[0] not in by_flag:
            continue
        default, shown = defaults[by_flag[named[0]]], cells[1].strip("`")
        if isinstance(default, bool):
            flag = flags(GenerateOptions)[by_flag[named[0]]]
            assert shown in (("off", "automatic") if not default or flag.invert else ("on", "filters on")), (named[0], shown)
        elif isinstance(default, (int, float, str)):
            assert re.search(rf"(?<![\w.]){re.escape(format(default, 'g') if isinstance(default, float) else str(default))}(?![\w.])",
                             shown), (named[0], shown, default)
        checked += 1
    assert checked >= 30


def test_every_generate_flag_is_a_keyword_of_the_api():
    from dataclasses import fields

    from cai.options import GenerateOptions

    names = {f.name for f in fields(GenerateOptions)}
    for flag in _help_flags("generate") - {"--output", "--quiet", "--no-lock", "--no-few-shot", "--no-filter", "--config", "--print-config", "--no-critique"}:
        assert flag[2:].replace("-", "_") in names, flag
    assert "lock" in names and "few_shot" in names and "filter" in names


def test_typed_errors_name_the_option():
    with pytest.raises(cai.OptionError) as caught:
        cai.generate(["hi"], device="tpu")
    assert caught.value.option == "device" and caught.value.flag().startswith("--device: unknown value 'tpu'")
    assert str(caught.value).startswith("device: unknown value")


# ---- issue 31: wrong types from Python are OptionErrors naming the option ----

@pytest.mark.parametrize("options, option, expected", [
    ({"max_new_tokens": "8"}, "max_new_tokens", "expected an integer, got str '8'"),
    ({"temperature": "hot"}, "temperature", "expected a number, got str 'hot'"),
    ({"temperature": float("nan")}, "temperature", "expected a number, got NaN"),
    ({"constitution": 5}, "constitution", "expected a string or a Constitution, got int 5"),
    ({"max_new_tokens": True}, "max_new_tokens", "expected an integer, got bool True"),
    ({"seed": 1.5}, "seed", "expected an integer, got float 1.5"),
    ({"filter": "no"}, "filter", "expected True or False, got str 'no'"),
    ({"few_shot": 1}, "few_shot", "expected True or False, got int 1"),
    ({"limit": "3"}, "limit", "expected an integer or None, got str '3'"),
    ({"similarity": None}, "similarity", "expected a number, got NoneType None"),
    ({"shard": 3}, "shard", "expected a string, a pair of integers or None, got int 3"),
    ({"clamp": [0.4, "x"]}, "clamp", "expected a string, a pair of numbers or None"),
    ({"concurrency": 2.0}, "concurrency", "expected an integer, got float 2.0"),
    ({"timeout": True}, "timeout", "expected a number, got bool True"),
    ({"api_key_env": 3}, "api_key_env", "expected a string or None, got int 3"),
    ({"templates": ["default"]}, "templates", "expected a string, got list"),
    ({"device": None}, "device", "expected a string, got NoneType None"),
])
def test_wrong_types_are_option_errors_naming_the_option_and_the_type(options, option, expected, tmp_path):
    with pytest.raises(cai.OptionError) as caught:
        cai.generate(["hi"], model=str(tmp_path / "no-model-needed"), **options)
    assert caught.value.option == option, str(caught.value)
    assert caught.value.detail.startswith(expected), str(caught.value)
    assert caught.value.flag().startswith(f"--{option.replace('_', '-')}: expected ")


def test_every_option_field_has_its_type_checked():
    """A value of no field's type (a set) is refused for every option of every options class."""
    from dataclasses import fields

    from cai.options import GenerateOptions, JudgeOptions, PreviewOptions

    for cls in (GenerateOptions, JudgeOptions, PreviewOptions):
        for field in fields(cls):
            if field.name == "model":
                continue                # a backend already open is any object with `stream`
            options = cls(**{field.name: {object()}})
            with pytest.raises(cai.OptionError) as caught:
                options.check()
            assert caught.value.option == field.name and "expected " in caught.value.detail, (cls, field.name)


def test_the_api_entry_points_check_their_own_arguments(tmp_path):
    calls = [
        (lambda: cai.generate(123), "prompts", "expected a string or an iterable, got int 123"),
        (lambda: cai.generate(["x"], output=5), "output", "expected a string or None, got int 5"),
        (lambda: cai.generate(["x"], progress=3), "progress", "expected a function or None"),
        (lambda: cai.judge(5), "pairs", "expected a string or an iterable, got int 5"),
        (lambda: cai.judge([1]), "pairs", "item 1: expected a record dict, got int"),
        (lambda: cai.judge([{"prompt": "p"}], batch_size="8"), "batch_size", "expected an integer, got str '8'"),
        (lambda: cai.merge("o.jsonl", "a.jsonl"), "inputs", "expected a list of strings, got str 'a.jsonl'"),
        (lambda: cai.merge("o.jsonl", ["a.jsonl"], overwrite="yes"), "overwrite", "expected True or False"),
        (lambda: cai.export("p.jsonl", "o.jsonl", test_size="0.1"), "test_size", "expected a number or None"),
        (lambda: cai.export("p.jsonl", "o.jsonl", formt="chat"), "formt", "unknown option; did you mean `format`?"),
        (lambda: cai.compare("a.jsonl", "b.jsonl", show="3"), "show", "expected an integer, got str '3'"),
        (lambda: cai.load_constitution(5), "spec", "expected a string, got int 5"),
    ]
    for call, option, expected in calls:
        with pytest.raises(cai.OptionError) as caught:
            call()
        assert caught.value.option == option and caught.value.detail.startswith(expected), str(caught.value)


def test_harmless_types_are_normalised_not_refused(tiny_model, tmp_path):
    """Paths for strings, integers for floats, a list for a tuple: taken as they are meant."""
    from pathlib import Path

    from cai.options import GenerateOptions

    options = GenerateOptions(model=Path(tiny_model), templates=Path(ROOT / "prompts" / "default"), temperature=0,
                              failures=tmp_path / "f.jsonl", shard=[1, 2], max_new_tokens=4)
    options.check()
    assert options.templates == str(ROOT / "prompts" / "default") and options.temperature == 0.0
    assert isinstance(options.temperature, float) and options.shard == (1, 2) and options.failures == str(tmp_path / "f.jsonl")
    summary = cai.generate(Path(ROOT / "examples" / "prompts.jsonl"), model=Path(tiny_model), limit=1, max_new_tokens=4,
                           temperature=0, filter=False)
    assert summary.kept == 1
