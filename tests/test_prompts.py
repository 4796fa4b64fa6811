"""Templates render in a sandbox, fail loudly, and build the growing conversation."""

from __future__ import annotations

import pytest

from cai.constitution import load_constitution
from cai.errors import TemplateError
from cai.prompts import ConversationBuilder, load_templates


def _template_dir(tmp_path, **overrides):
    folder = tmp_path / "tpl"
    folder.mkdir()
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
    with pytest.raises(TemplateError, match=r"critique.jinja: cannot render"):
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
