"""Templates render in a sandbox, fail loudly, and build the growing conversation."""

from __future__ import annotations

import pytest

from cai.constitution import load_constitution
from cai.errors import TemplateError
from cai.templates import ConversationBuilder, load_templates


def _template_dir(tmp_path, **overrides):
    folder = tmp_path / "tpl"
    folder.mkdir(parents=True)
    files = {"prompt": "{{ prompt }}", "critique": "{{ principle.critique }}", "revision": "{{ principle.revision }}"}
    files.update(overrides)
    for name, text in files.items():
        (folder / f"{name}.jinja").write_text(text)
    return folder


def test_conversation_has_prefix_then_prompt():
    c = load_constitution("harmless")
    builder = ConversationBuilder(c, load_templates("default"))
    messages = builder.opening("Hello?")
    assert messages[0]["role"] == "system"
    assert len(messages) == 1 + 6 * len(c.few_shot) + 1
    assert messages[-1] == {"role": "user", "content": "Hello?"}
    assert [m["role"] for m in messages[1:7]] == ["user", "assistant"] * 3
    assert c.few_shot[0].critique == messages[4]["content"]
    request = builder.critique_request(c.principles[0], 1, "Hello?")
    assert request["role"] == "user" and c.principles[0].critique in request["content"]


def test_template_cannot_reach_python_internals(tmp_path):
    folder = _template_dir(tmp_path, prompt="{{ prompt.__class__.__mro__ }}")
    with pytest.raises(TemplateError, match="prompt.jinja"):
        load_templates(str(folder))


def test_undefined_variable_fails_at_load(tmp_path):
    folder = _template_dir(tmp_path, critique="{{ principle.critque }}")
    with pytest.raises(TemplateError, match=r"critique.jinja:1: cannot render: .*critque"):
        load_templates(str(folder))


def test_syntax_error_names_the_line(tmp_path):
    folder = _template_dir(tmp_path, revision="line one\n{{ principle.revision ")
    with pytest.raises(TemplateError, match=r"revision.jinja:2: template syntax error"):
        load_templates(str(folder))


def test_missing_required_template(tmp_path):
    folder = _template_dir(tmp_path)
    (folder / "revision.jinja").unlink()
    with pytest.raises(TemplateError, match="revision.jinja: missing template file"):
        load_templates(str(folder))


@pytest.mark.parametrize("source, message", [
    ("{% include 'x.jinja' %}", r"prompt.jinja:1: \{% include %\} is not supported"),
    ("{% import 'x.jinja' as x %}{{ prompt }}", r"prompt.jinja:1: \{% import %\} is not supported"),
    ("{% extends 'base.jinja' %}", r"prompt.jinja:1: \{% extends %\} is not supported"),
    ("{{ prompt }}\n{% if false %}{% include 'x.jinja' %}{% endif %}", r"prompt.jinja:2: \{% include %\}"),
])
def test_other_files_are_refused_at_load(tmp_path, source, message):
    """Was a TypeError traceback ("no loader for this environment specified"), and inside a
    branch the sample render never takes, not even that."""
    folder = _template_dir(tmp_path, prompt=source)
    with pytest.raises(TemplateError, match=message):
        load_templates(str(folder))


@pytest.mark.parametrize("source, message", [
    ("{% for i in range(10**9) %}x{% endfor %}{{ prompt }}", r"range\(\) of 1,000,000,000 items"),
    ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}{{ prompt }}",
     r"more than 1,000,000 items in one render"),
    ("{{ prompt }}\n{{ 1 / 0 }}", r"prompt.jinja:2: cannot render: ZeroDivisionError: division by zero"),
    ("{{ prompt + 1 }}", r"prompt.jinja:1: cannot render: TypeError: can only concatenate str"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", r"prompt.jinja:1: cannot render: too deep a recursion"),
    ("{{ 'x' * 10**8 }}", r"'\*' would make 100,000,000 items"),
    ("{{ 7 ** 10000000 }}", r"'\*\*' would make an integer"),
    ("{% for i in range(90000) %}{{ 'yyyyyyyyyyyyy' }}{% endfor %}", r"the output passes 1,000,\d{3} characters"),
    ("{{ lipsum(10**6) }}", r"'lipsum' is undefined"),
])
def test_render_time_failures_are_template_errors_at_load(tmp_path, source, message):
    """Each was an exception other than jinja's TemplateError (OverflowError, ZeroDivisionError,
    TypeError, RecursionError), a traceback, or unbounded work; now one line naming the file."""
    folder = _template_dir(tmp_path, prompt=source)
    with pytest.raises(TemplateError, match=message) as caught:
        load_templates(str(folder))
    assert caught.value.path.endswith("prompt.jinja") and "\n" not in str(caught.value)


def test_a_failure_only_some_prompts_hit_is_a_template_error_during_the_run(tmp_path):
    """Was a ZeroDivisionError (or OverflowError) traceback out of the middle of a run."""
    folder = _template_dir(tmp_path, prompt="{{ prompt }} {{ 100 // (prompt | length - 4) }}")
    builder = ConversationBuilder(load_constitution("harmless"), load_templates(str(folder)), few_shot=False)
    assert builder.user_prompt("fine!")["content"] == "fine! 100"
    with pytest.raises(TemplateError, match=r"prompt.jinja:1: cannot render: ZeroDivisionError"):
        builder.user_prompt("four")
    templates = load_templates(str(_template_dir(tmp_path / "b", prompt="{{ prompt }}{{ range(prompt | int) | list | length }}")))
    assert templates.render("prompt", prompt="3") == "33"
    with pytest.raises(TemplateError, match=r"prompt.jinja:1: cannot render: range\(\) of"):
        templates.render("prompt", prompt="1000000000")


def test_templates_are_checked_with_the_variables_a_run_gives_them(tmp_path):
    """The system message renders with no principle during a run, and a later round may take
    another branch: both were passed at load and failed mid-run."""
    folder = _template_dir(tmp_path, system="You follow {{ principle.id }}.")
    with pytest.raises(TemplateError, match=r"system.jinja:1: cannot render"):
        load_templates(str(folder))
    folder = _template_dir(tmp_path / "b", critique="{% if round > 1 %}{{ principle.missing }}{% endif %}x")
    with pytest.raises(TemplateError, match=r"critique.jinja:1: cannot render"):
        load_templates(str(folder))


def test_the_shipped_set_still_renders_and_bounds_leave_normal_use_alone(tmp_path):
    templates = load_templates("default")
    long_prompt = "word " * 400_000                     # 2,000,000 characters, past MAX_CHARS alone
    assert templates.render("prompt", prompt=long_prompt) == long_prompt.strip()
    folder = _template_dir(tmp_path, prompt="{% for i in range(3) %}{{ i }}{% endfor %} {{ prompt * 2 }} {{ 2 ** 10 }}")
    assert load_templates(str(folder)).render("prompt", prompt="ab") == "012 abab 1024"
