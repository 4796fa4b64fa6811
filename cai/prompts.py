"""Prompt templates (the wording around each turn) and the chat messages of each stage.

A template set is a folder of Jinja2 files, shipped ones under `prompts/<name>/`:
  system.jinja    optional system message (empty output: no system message)
  prompt.jinja    the user turn made from the input prompt          vars: prompt
  critique.jinja  the user turn that asks for a critique            vars: principle, round, prompt
  revision.jinja  the user turn that asks for a rewrite             vars: principle, round, prompt
  judge.jinja     optional: the multiple-choice question of `cai judge`  vars: prompt, question, a, b
                  (a folder without one uses the shipped default's; it is not part of a
                  generation run's fingerprint)
Templates render in a sandbox (no access to Python objects) and fail on undefined variables.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from cai.messages import Message
from cai.constitution import Constitution, Principle
from cai.shipped import data_dir
from cai.errors import TemplateError

TEMPLATE_NAMES = ("system", "prompt", "critique", "revision")
JUDGE = "judge"
_REQUIRED = ("prompt", "critique", "revision")
_SAMPLE_PRINCIPLE = Principle(id="sample", critique="Identify problems.", revision="Fix them.",
                              choice="Which is better?", tags=("sample",))


@dataclass(frozen=True)
class Templates:
    name: str
    sources: dict[str, str]
    compiled: dict[str, jinja2.Template]
    paths: dict[str, str]

    @property
    def sha256(self) -> str:
        digest = hashlib.sha256()
        for key in TEMPLATE_NAMES:
            digest.update(key.encode() + b"\0" + self.sources.get(key, "").encode() + b"\0")
        return digest.hexdigest()

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.sha256[:12]}"

    def render(self, key: str, **variables: Any) -> str:
        template = self.compiled.get(key)
        if template is None:
            return ""
        try:
            return template.render(**variables).strip()
        except jinja2.TemplateError as exc:
            raise TemplateError(self.paths[key], f"cannot render: {exc}") from None


def _environment() -> ImmutableSandboxedEnvironment:
    return ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False,
                                         keep_trailing_newline=False)


def shipped_templates() -> dict[str, Path]:
    return {p.name: p for p in sorted(data_dir("prompts").iterdir()) if p.is_dir()}


def load_templates(spec: str = "default") -> Templates:
    """A shipped template set by name, or a folder of .jinja files. Every template is compiled
    and rendered once with sample values, so a broken one fails before any model is loaded."""
    folder = Path(spec).expanduser()
    name = str(folder)
    if not folder.is_dir():
        shipped = shipped_templates()
        if spec not in shipped:
            raise TemplateError(spec, f"no such template folder; shipped: {', '.join(shipped)}")
        folder, name = shipped[spec], spec
    env = _environment()
    sources: dict[str, str] = {}
    compiled: dict[str, jinja2.Template] = {}
    paths: dict[str, str] = {}
    for key in (*TEMPLATE_NAMES, JUDGE):
        path = folder / f"{key}.jinja"
        if key == JUDGE and not path.exists():
            path = shipped_templates()["default"] / f"{key}.jinja"
        paths[key] = str(path)
        if not path.exists():
            if key in _REQUIRED:
                raise TemplateError(path, "missing template file")
            continue
        try:
            source = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise TemplateError(path, "file is not valid UTF-8") from None
        try:
            compiled[key] = env.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(path, f"template syntax error: {exc.message}", line=exc.lineno) from None
        sources[key] = source
    templates = Templates(name=name, sources=sources, compiled=compiled, paths=paths)
    sample = _SAMPLE_PRINCIPLE.as_template_vars()
    for key in TEMPLATE_NAMES:
        out = templates.render(key, prompt="sample prompt", principle=sample, round=1)
        if key in _REQUIRED and not out:
            raise TemplateError(paths[key], "renders to an empty message")
    if JUDGE in compiled and not templates.render(JUDGE, prompt="p", question="q", a="a", b="b"):
        raise TemplateError(paths[JUDGE], "renders to an empty message")
    return templates


class ConversationBuilder:
    """Builds the messages of the growing conversation: [system] [few-shot turns] user prompt,
    then critique and revision requests. The prefix (system + few-shot) is the same for every
    prompt, so it is built once."""

    def __init__(self, constitution: Constitution, templates: Templates, few_shot: bool = True):
        self.constitution = constitution
        self.templates = templates
        self.prefix: tuple[Message, ...] = tuple(self._prefix(few_shot))

    def _prefix(self, few_shot: bool) -> list[Message]:
        messages: list[Message] = []
        self.system = self.templates.render("system", prompt="", principle=None, round=0)
        if self.system:
            messages.append({"role": "system", "content": self.system})
        for example in self.constitution.few_shot if few_shot else ():
            principle = self.constitution.few_shot_principle(example)
            messages += [
                self.user_prompt(example.prompt),
                {"role": "assistant", "content": example.response},
                self.critique_request(principle, 1, example.prompt),
                {"role": "assistant", "content": example.critique},
                self.revision_request(principle, 1, example.prompt),
                {"role": "assistant", "content": example.revision},
            ]
        return messages

    def user_prompt(self, prompt: str) -> Message:
        return {"role": "user", "content": self.templates.render("prompt", prompt=prompt)}

    def opening(self, prompt: str) -> list[Message]:
        return [*self.prefix, self.user_prompt(prompt)]

    def critique_request(self, principle: Principle, round_no: int, prompt: str) -> Message:
        text = self.templates.render("critique", principle=principle.as_template_vars(), round=round_no, prompt=prompt)
        return {"role": "user", "content": text}

    def revision_request(self, principle: Principle, round_no: int, prompt: str) -> Message:
        text = self.templates.render("revision", principle=principle.as_template_vars(), round=round_no, prompt=prompt)
        return {"role": "user", "content": text}
