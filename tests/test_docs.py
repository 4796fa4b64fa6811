"""The documentation: the README stays a front page, the mkdocs site builds with --strict, the CLI
reference equals each command's --help, the getting-started shell lines run through the CLI on the
tiny model, and the troubleshooting page quotes errors that still exist."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from cai.cli import app
from conftest import ROOT, plumbing

DOCS = ROOT / "docs"


def code_blocks(path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(encoding="utf-8"), re.S)


def test_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move detail into docs/"
    assert lines[0].startswith("# cai")
    assert lines[2:6] == ["```sh",
                          "make demo   # fresh machine: venv, install, the embedded model, pairs from examples/prompts.jsonl",
                          "make test   # fresh machine: venv, install, the whole test suite",
                          "```"], "the two commands come first"
    for target in re.findall(r"\]\((docs/[^)#]+)", text):          # the README's links into docs/ exist
        assert (ROOT / target).exists(), target


def test_mkdocs_build_strict(tmp_path):
    """`mkdocs build --strict`: a broken link or anchor, a page missing from the nav, or an API
    object mkdocstrings cannot find fails it. Runs in CI (mkdocs is in the dev extra), never skips."""
    started = time.monotonic()
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                             "-d", str(tmp_path / "site")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "reference" / "generate" / "index.html").exists()
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    assert "cai.api.generate" in api, "mkdocstrings rendered the API"
    print(f"mkdocs build --strict: {time.monotonic() - started:.1f} s")


def _gen_cli():
    spec = importlib.util.spec_from_file_location("gen_cli", DOCS / "gen_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_matches_help():
    wanted = _gen_cli().pages()
    assert {"generate.md", "constitution.md", "constitution-validate.md", "index.md"} <= set(wanted)
    committed = {p.name for p in (DOCS / "reference").glob("*.md")}
    assert committed == set(wanted), "docs/reference/ is out of date with the commands: run `make docs-cli`"
    stale = [name for name, text in wanted.items() if (DOCS / "reference" / name).read_text(encoding="utf-8") != text]
    assert stale == [], f"docs/reference/ {stale} differ from --help: run `make docs-cli` and commit the pages"


def test_cli_reference_is_stable():
    """The help text does not depend on the terminal it is rendered under."""
    gen = _gen_cli()
    first = gen.help_text(("generate",))
    saved = {k: os.environ.get(k) for k in ("COLUMNS", "TERM", "FORCE_COLOR")}
    os.environ.update(COLUMNS="240", TERM="xterm-256color", FORCE_COLOR="1")
    try:
        assert gen.help_text(("generate",)) == first
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert "\x1b[" not in first and max(map(len, first.splitlines())) <= gen.WIDTH


# Lines of getting-started.md the test does not run, and why: they need what a test machine has not.
NOT_RUN = {
    "make": "builds the venv (what `make test` itself does)",
    "python3": "creates a venv",
    "pip": "installs packages",
    "trl": "a real trainer run (tests/test_export_trainers.py trains from such a folder)",
    "cai review": "serves a page until stopped (tests/test_review.py and test_review_browser.py drive it)",
}
MODEL_COMMANDS = {"generate", "preview", "judge"}


def _run_shell_block(block: str, tiny_model, workdir) -> list[str]:
    """Run each `cai …` line of a block through the CLI; return the lines not run, with why."""
    skipped = []
    for line in block.splitlines():
        tokens = shlex.split(line, comments=True)
        if not tokens:
            continue
        segments, current = [], []
        for token in tokens + ["|"]:
            if token in ("|", "&&"):
                segments.append(current)
                current = []
            else:
                current.append(token)
        cai = [s for s in segments if s and s[0] == "cai"]
        key = next((k for k in NOT_RUN if " ".join(tokens).startswith(k)), None)
        if key or not cai:
            assert key, f"a line the test neither runs nor names in NOT_RUN: {line}"
            skipped.append(f"{line.split('#')[0].strip()}  ({NOT_RUN[key]})")
            continue
        assert len(cai) == 1, line
        args = cai[0][1:]
        if "--backend" in args:
            skipped.append(f"{line}  (needs a real server)")
            continue
        stdin = None
        before = segments[:segments.index(cai[0])]
        if before:
            assert before[-1][0] == "cat", line
            stdin = (workdir / before[-1][1]).read_text(encoding="utf-8")
        if args[0] in MODEL_COMMANDS:
            if "--model" in args:
                args[args.index("--model") + 1] = str(tiny_model)
            else:
                args += ["--model", str(tiny_model)]
        if args[0] in ("generate", "preview") and "--max-new-tokens" not in args:
            args += ["--max-new-tokens", "8"]
        result = CliRunner().invoke(app, plumbing(args), input=stdin)
        assert result.exit_code == 0, f"{line}\n{result.output}"
        assert "Traceback" not in result.output
    return skipped


def test_getting_started_shell_lines_run(tiny_model, tmp_path, monkeypatch):
    """Every `cai …` line of docs/getting-started.md, on the tiny model (`--model` replaced, at most 8
    new tokens a turn), each block in a fresh folder holding examples/. Lines not run are those of
    NOT_RUN (venv and installs, the trainer, the review server) and `--backend openai` ones. As in
    the other CLI tests, `generate` gets --no-filter (conftest.plumbing): the filters drop all of the
    tiny model's random text, and the lines after it need pairs to look at."""
    blocks = code_blocks(DOCS / "getting-started.md", "sh")
    assert len(blocks) >= 4
    skipped = []
    for i, block in enumerate(blocks):
        workdir = tmp_path / f"block{i}"
        shutil.copytree(ROOT / "examples", workdir / "examples")
        monkeypatch.chdir(workdir)
        skipped += _run_shell_block(block, tiny_model, workdir)
        if "--to trl dpo-data/" in block:
            assert (workdir / "dpo-data" / "trl_dpo.yaml").exists()
        if "my-constitution.yaml" in block:
            assert (workdir / "my-constitution.yaml").exists()
    print("not run:", *skipped, sep="\n  ")
    ran = sum(1 for b in blocks for line in b.splitlines() if line.startswith("cai ")) - sum("cai " in s[:4] for s in skipped)
    assert ran >= 10, "the getting-started page's cai lines run"


def test_readme_python_snippet_runs(tiny_model, tmp_path, monkeypatch):
    code = code_blocks(ROOT / "README.md", "python")[0]
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    code = code.replace('"pairs.jsonl", ', f'"pairs.jsonl", model={str(tiny_model)!r}, ')
    code = code.replace("max_new_tokens=64", "max_new_tokens=8")
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "pairs.jsonl").exists()


def test_troubleshooting_quotes_real_errors():
    """Each error the troubleshooting tables quote (first column) is still in the tests or the code."""
    text = (DOCS / "troubleshooting.md").read_text(encoding="utf-8")
    quoted = re.findall(r"^\| `(.+?)` \|", text, re.M) + re.findall(r"^- \*\*`([^`]+)`", text, re.M)
    assert len(quoted) >= 40
    sources = "\n".join(p.read_text(encoding="utf-8", errors="replace")
                        for folder in ("tests", "cai") for p in (ROOT / folder).rglob("*.py"))
    sources = sources.replace("\\'", "'")
    missing = [q for q in quoted if q not in sources]
    assert missing == [], f"troubleshooting.md quotes errors no test or code has: {missing}"
