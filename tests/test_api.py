"""The public Python API: the README's snippet runs as written (on the tiny model), `cai`
exports what `__all__` says, and the CLI's options are the API's keyword arguments."""

from __future__ import annotations

import re
import shutil

import pytest
from typer.testing import CliRunner

import cai
from cai.cli import app
from conftest import ROOT, read_jsonl


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_the_readme_snippet_runs(tiny_model, tmp_path, monkeypatch, capsys):
    code = re.search(r"```python\n(.*?)```", readme_section("Python API"), re.S).group(1)
    assert 'model="smollm2-135m-instruct"' in code
    (tmp_path / "examples").mkdir()
    shutil.copy(ROOT / "examples" / "prompts.jsonl", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("smollm2-135m-instruct", str(tiny_model)), "README.md", "exec"), {})
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


def _readme_flags() -> set[str]:
    table = readme_section("`cai generate` options")
    first_cells = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", " ".join(first_cells)))


def test_readme_option_table_matches_generate_help():
    documented, offered = _readme_flags(), _help_flags("generate")
    assert documented - offered == set(), "in the README but not in --help"
    assert offered - documented - {"--few-shot", "--filter"} == set(), "in --help but not in the README table"


def test_every_generate_flag_is_a_keyword_of_the_api():
    from dataclasses import fields

    from cai.options import GenerateOptions

    names = {f.name for f in fields(GenerateOptions)}
    for flag in _help_flags("generate") - {"--output", "--quiet", "--no-lock", "--no-few-shot", "--no-filter"}:
        assert flag[2:].replace("-", "_") in names, flag
    assert "lock" in names and "few_shot" in names and "filter" in names


def test_typed_errors_name_the_option():
    with pytest.raises(cai.OptionError) as caught:
        cai.generate(["hi"], device="tpu")
    assert caught.value.option == "device" and caught.value.flag().startswith("--device: unknown value 'tpu'")
    assert str(caught.value).startswith("device: unknown value")
