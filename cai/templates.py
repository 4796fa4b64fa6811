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
Each is one self-contained file: `{% include %}`, `{% import %}` and `{% extends %}` are refused
(another file would escape the set's fingerprint). A render is bounded: range() hands out at most
RANGE_ITEMS items in all, `*` and `**` refuse huge results, and the output stops at MAX_CHARS
(plus ten times the variables' text). Any failure while rendering, at load or during a run, is a
TemplateError naming the file and, where known, the line.
"""

from __future__ import annotations

import contextvars
import hashlib
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment

from cai.messages import Message
from cai.constitution import Constitution, Principle
from cai.shipped import data_dir
from cai.errors import TemplateError

TEMPLATE_NAMES = ("system", "prompt", "critique", "revision")
JUDGE = "judge"
_REQUIRED = ("prompt", "critique", "revision")
_SAMPLE_PRINCIPLE = Principle(id="sample", critique="Identify problems.", revision="Fix them.",
                              choice="Which is better?", tags=("sample",))

RANGE_ITEMS = 1_000_000     # range() items one render may ask for, all calls together (jinja caps one call)
MAX_CHARS = 1_000_000       # a render's output, beyond ten times the length of its variables' text
_TEMPLATE_FILE = "<template>"   # the file name jinja gives the frames of templates made from strings


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
        limit = MAX_CHARS + 10 * sum(len(v) for v in variables.values() if isinstance(v, str))
        token = _range_left.set([RANGE_ITEMS])
        try:
            parts, size = [], 0
            for chunk in template.generate(**variables):
                size += len(chunk)
                if size > limit:
                    raise _Limit(f"the output passes {limit:,} characters (a runaway loop?)")
                parts.append(chunk)
        except Exception as exc:        # jinja's own errors and any the expressions raise
            line = next((n for f, n in reversed(list(traceback.walk_tb(exc.__traceback__)))
                         if f.f_code.co_filename == _TEMPLATE_FILE), None)
            raise TemplateError(self.paths[key], f"cannot render: {_describe(exc)}", line=line) from None
        finally:
            _range_left.reset(token)
        return "".join(parts).strip()


class _Limit(jinja2.TemplateRuntimeError):
    """A render that went past one of the bounds above."""


def _describe(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or "(no message)"
    if isinstance(exc, jinja2.TemplateError):
        return text
    if isinstance(exc, RecursionError):
        return "too deep a recursion (a macro that calls itself without end?)"
    return f"{type(exc).__name__}: {text}"


_range_left: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("range_left", default=None)


def _range(*args: int) -> range:
    """range() for templates: at most MAX_RANGE items a call (jinja's sandbox bound) and
    RANGE_ITEMS in one render (nested loops multiply)."""
    items = range(*args)
    try:
        n = len(items)
    except OverflowError:
        n = MAX_RANGE + 1
    if n > MAX_RANGE:
        raise _Limit(f"range() of {n:,} items; at most {MAX_RANGE:,}")
    left = _range_left.get()
    if left is not None:
        left[0] -= n
        if left[0] < 0:
            raise _Limit(f"range() calls ask for more than {RANGE_ITEMS:,} items in one render (nested loops?)")
    return items


class _NoLoader(jinja2.BaseLoader):
    def get_source(self, environment, template):
        raise jinja2.TemplateError(f"cannot load '{template}': a template is one self-contained file "
                                   "({% include %}, {% import %} and {% extends %} are not supported)")


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox, with `*` and `**` checked so that one expression cannot build a huge value."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int) and times > 1 \
                        and len(seq) * times > max(MAX_CHARS, len(seq)):
                    raise _Limit(f"'*' would make {len(seq) * times:,} items; at most {MAX_CHARS:,}")
        elif isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1 \
                and (abs(left).bit_length() - 1) * right > 100_000:
            raise _Limit("'**' would make an integer of more than 100,000 bits")
        return super().call_binop(context, operator, left, right)


def _environment() -> ImmutableSandboxedEnvironment:
    env = _Sandbox(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False,
                   loader=_NoLoader())
    env.globals["range"] = _range
    env.globals.pop("lipsum", None)      # paragraphs of filler text, as many as asked: no use here
    return env


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
            tree = env.parse(source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(path, f"template syntax error: {exc.message}", line=exc.lineno) from None
        other = next(tree.find_all((nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)), None)
        if other is not None:
            tag = {"Extends": "extends", "Include": "include"}.get(type(other).__name__, "import")
            raise TemplateError(path, f"{{% {tag} %}} is not supported: a template is one self-contained file",
                                line=other.lineno)
        compiled[key] = env.from_string(tree)
        sources[key] = source
    templates = Templates(name=name, sources=sources, compiled=compiled, paths=paths)
    # each with the variables a run gives it (ConversationBuilder): the system message once, with
    # no prompt or principle; the critique and revision requests in a first and a later round
    sample = _SAMPLE_PRINCIPLE.as_template_vars()
    templates.render("system", prompt="", principle=None, round=0)
    for key, rounds in (("prompt", (1,)), ("critique", (1, 2)), ("revision", (1, 2))):
        for round_no in rounds:
            if not templates.render(key, prompt="sample prompt", principle=sample, round=round_no):
                raise TemplateError(paths[key], "renders to an empty message")
    if JUDGE in compiled and not templates.render(JUDGE, prompt="p", question="q", a="a", b="b"):
        raise TemplateError(paths[JUDGE], "renders to an empty message")
    return templates


class ConversationBuilder:
    """Builds the messages of the growing conversation: [system] [few-shot turns] user prompt,
    then critique and revision requests. The prefix (system + few-shot) is the same for every
    prompt, so it is built once."""

    def __init__(self, constitution: Constitution, templates: Templates, few_shot: bool = True,
                 critique: bool = True):
        self.constitution = constitution
        self.templates = templates
        self.critique = critique            # False: worked examples revise without their critique turns
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
                *([self.critique_request(principle, 1, example.prompt),
                   {"role": "assistant", "content": example.critique}] if self.critique else []),
                self.revision_request(principle, 1, example.prompt),
                {"role": "assistant", "content": example.revision},
            ]
        return messages

    def user_prompt(self, prompt: str) -> Message:
        return {"role": "user", "content": self.templates.render("prompt", prompt=prompt)}

    def opening(self, prompt: str, history: tuple[Message, ...] | list[Message] = ()) -> list[Message]:
        """The conversation up to the prompt: [system] [worked examples] [earlier turns] prompt. A
        conversation's own system turn takes the place of the template's; its earlier turns come
        as they are (only the last user turn goes through prompt.jinja)."""
        if not history:
            return [*self.prefix, self.user_prompt(prompt)]
        prefix = list(self.prefix)
        if history[0]["role"] == "system":
            prefix = [dict(history[0]), *(prefix[1:] if self.system else prefix)]
            history = history[1:]
        return [*prefix, *(dict(m) for m in history), self.user_prompt(prompt)]

    def critique_request(self, principle: Principle, round_no: int, prompt: str) -> Message:
        text = self.templates.render("critique", principle=principle.as_template_vars(), round=round_no, prompt=prompt)
        return {"role": "user", "content": text}

    def revision_request(self, principle: Principle, round_no: int, prompt: str) -> Message:
        text = self.templates.render("revision", principle=principle.as_template_vars(), round=round_no, prompt=prompt)
        return {"role": "user", "content": text}
