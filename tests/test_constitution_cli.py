"""`cai constitution …` commands, and ≥ 25 malformed files each reported at file:line:column."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cai.cli import app
from cai.constitution import data_dir, json_schema, load_constitution, shipped_constitutions
from conftest import DATA, ROOT, plumbing, read_jsonl

BAD = sorted((DATA / "bad").glob("*.yaml"))
SHIPPED = sorted(shipped_constitutions())


def run(*args):
    return CliRunner().invoke(app, plumbing(args))


def expectation(path: Path) -> str:
    first = path.read_bytes().split(b"\n", 1)[0].decode()
    assert first.startswith("# expect: ")
    return f"{path}:{first[len('# expect: '):]}"


def test_there_are_at_least_25_malformed_files():
    assert len(BAD) >= 25


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_validate_names_file_line_and_problem(path):
    result = run("constitution", "validate", path)
    assert result.exit_code == 2
    assert result.stdout == ""
    first = result.stderr.splitlines()[0]
    assert first == f"error: {expectation(path)}"
    assert "Traceback" not in result.output


@pytest.mark.parametrize("path", BAD[:6], ids=[p.stem for p in BAD[:6]])
def test_generate_refuses_a_malformed_constitution_before_loading_a_model(path):
    result = run("generate", ROOT / "examples" / "prompts.jsonl", "--constitution", path,
                 "--model", "./no-model-needed")
    assert result.exit_code == 2
    assert expectation(path) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 or "more: cai constitution validate" in result.stderr


def test_validate_reports_every_problem_and_every_file(tmp_path):
    bad = tmp_path / "two.yaml"
    bad.write_text("name: t\nprinciples:\n  - id: a\n    critque: c\n    revision: r\n    weigth: 2\n")
    result = run("constitution", "validate", "harmless", bad, DATA / "three.yaml")
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert f"error: {bad}:4:5: principles[0].critque: unknown key; did you mean 'critique'?" in errors
    assert f"error: {bad}:6:5: principles[0].weigth: unknown key; did you mean 'weight'?" in errors
    assert f"error: {bad}:3:5: principles[0].critique: missing required key" in errors
    assert result.stderr.count("ok ") == 2
    assert run("constitution", "validate", "harmless", DATA / "three.yaml").exit_code == 0


def test_generate_mentions_how_many_more_problems(tmp_path):
    bad = tmp_path / "two.yaml"
    bad.write_text("name: t\nprinciples:\n  - id: a\n    critque: c\n    revision: r\n    weigth: 2\n")
    result = run("generate", ROOT / "examples" / "prompts.jsonl", "-c", bad)
    assert result.exit_code == 2
    assert "(and 2 more: cai constitution validate" in result.stderr


def test_list_shows_every_shipped_constitution_with_counts():
    result = run("constitution", "list")
    assert result.exit_code == 0
    for name in ("harmless", "helpful-honest", "minimal"):
        c = load_constitution(name)
        row = next(line for line in result.stdout.splitlines() if f" {name} " in line)
        assert f" {len(c.principles)} " in row


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_constitutions_validate_and_show(name):
    c = load_constitution(name)
    assert len(c.few_shot) >= 2
    benign = [ex for ex in c.few_shot if ex.revision == ex.response]
    assert benign, "a benign few-shot example whose revision keeps the answer guards against over-refusal"
    table = run("constitution", "show", name)
    assert table.exit_code == 0
    assert all(p.id in table.stdout for p in c.principles)
    shown = json.loads(run("constitution", "show", name, "--json").stdout)
    assert shown["ref"] == c.ref
    assert [p["id"] for p in shown["principles"]] == [p.id for p in c.principles]


def test_library_sizes():
    assert len(load_constitution("harmless").principles) >= 12
    assert len(load_constitution("minimal").principles) == 3
    tags = {t for p in load_constitution("helpful-honest").principles for t in p.tags}
    assert "honesty" in tags


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_constitutions_drive_generate(tiny_model, tmp_path, name):
    out = tmp_path / "pairs.jsonl"
    result = run("generate", ROOT / "examples" / "prompts.jsonl", "--model", tiny_model, "-c", name,
                 "-o", out, "--limit", "2", "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output
    records = read_jsonl(out)
    ids = {p.id for p in load_constitution(name).principles}
    assert len(records) == 2 and all(r["principle"] in ids for r in records)
    assert all(r["meta"]["constitution"] == load_constitution(name).ref for r in records)


def test_schema_command_matches_shipped_schema_file():
    result = run("constitution", "schema")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == json_schema()
    shipped = json.loads((data_dir("constitutions") / "schema.json").read_text())
    assert shipped == json_schema(), "regenerate constitutions/schema.json with `cai constitution schema`"
    for path in data_dir("constitutions").glob("*.yaml"):
        assert path.read_text().startswith("# yaml-language-server: $schema=schema.json\n")


def test_schema_agrees_with_validation():
    jsonschema = pytest.importorskip("jsonschema")
    import yaml

    validator = jsonschema.Draft202012Validator(json_schema())
    for path in data_dir("constitutions").glob("*.yaml"):
        assert not list(validator.iter_errors(yaml.safe_load(path.read_text()))), path
    for stem in ("unknown-top-key", "zero-weight", "bad-sampling", "id-not-slug", "empty-principles",
                 "missing-revision", "tags-not-list", "zero-revisions", "name-number"):
        data = yaml.safe_load((DATA / "bad" / f"{stem}.yaml").read_text())
        assert list(validator.iter_errors(data)), stem


def test_init_writes_a_starter_that_validates(tmp_path):
    target = tmp_path / "mine.yaml"
    result = run("constitution", "init", target)
    assert result.exit_code == 0, result.output
    text = target.read_text()
    assert text.startswith("# yaml-language-server: $schema=file://")
    assert "name: my-constitution" in text and text.count("\n#") > 10
    assert run("constitution", "validate", target).exit_code == 0
    again = run("constitution", "init", target)
    assert again.exit_code == 2 and "--force" in again.stderr
    assert run("constitution", "init", target, "--force").exit_code == 0
    assert run("constitution", "init", "-").stdout == text


# ---- issue 31: hostile YAML and merge keys through the commands ----

@pytest.mark.parametrize("text", ["[" * 5000 + "]" * 5000, "{a: " * 5000 + "1" + "}" * 5000,
                                  "name: t\nprinciples:\n" + "".join("  " * i + f"- k{i}:\n" for i in range(1, 120))],
                         ids=["lists", "mappings", "block"])
def test_deep_nesting_is_one_line_from_validate_show_and_generate(tmp_path, text):
    path = tmp_path / "deep.yaml"
    path.write_text(text)
    for args in (("constitution", "validate", path), ("constitution", "show", path),
                 ("generate", ROOT / "examples" / "prompts.jsonl", "-c", path, "--model", "./no-model-needed")):
        result = run(*args)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output and result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {path}:"), result.stderr
        assert "YAML nested too deeply" in lines[0]


def test_a_constitution_with_merge_keys_validates_shows_and_drives_generate(tiny_model, tmp_path):
    path = tmp_path / "merged.yaml"
    path.write_text("name: merged\nprinciples:\n"
                    "  - &base\n    id: kind\n    critique: Is the answer unkind?\n    revision: Rewrite it kindly.\n"
                    "    tags: [tone]\n"
                    "  - <<: *base\n    id: brief\n    critique: Is it too long?\n"
                    "  - <<: *base\n    id: plain\n    revision: Rewrite it plainly.\n    weight: 2\n")
    result = run("constitution", "validate", path)
    assert result.exit_code == 0 and "3 principles" in result.stderr, result.output
    shown = json.loads(run("constitution", "show", path, "--json").stdout)
    assert [(p["id"], p["critique"], p["revision"], p["tags"], p["weight"]) for p in shown["principles"]] == [
        ("kind", "Is the answer unkind?", "Rewrite it kindly.", ["tone"], 1.0),
        ("brief", "Is it too long?", "Rewrite it kindly.", ["tone"], 1.0),
        ("plain", "Is the answer unkind?", "Rewrite it plainly.", ["tone"], 2.0)]
    out = tmp_path / "pairs.jsonl"
    result = run("generate", ROOT / "examples" / "prompts.jsonl", "--model", tiny_model, "-c", path, "-o", out,
                 "--limit", "1", "--sampling", "all", "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output
    records = read_jsonl(out)
    assert sorted(r["principle"] for r in records) == ["brief", "kind", "plain"]
    assert all(r["meta"]["constitution"] == load_constitution(str(path)).ref for r in records)
