"""The constitution: a YAML list of principles, loaded into typed objects and validated with
file:line:column for every problem. Pure Python (no torch), so validation answers at once."""

from __future__ import annotations

import difflib
import hashlib
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cai.errors import ConstitutionError

SAMPLING_MODES = ("random", "all", "cycle")
SLUG = re.compile(r"^[a-z0-9]+(?:[-_][a-z0-9]+)*$")


def data_dir(kind: str) -> Path:
    """Folder of shipped data (`constitutions`, `prompts`): inside the installed package, or at
    the top of a source checkout (editable install)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / kind, here.parent / kind):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"shipped data folder '{kind}' is missing from this installation")


@dataclass(frozen=True)
class Principle:
    id: str
    critique: str
    revision: str
    choice: str | None = None
    tags: tuple[str, ...] = ()
    weight: float = 1.0

    def as_template_vars(self) -> dict[str, Any]:
        return {"id": self.id, "critique": self.critique, "revision": self.revision,
                "choice": self.choice, "tags": list(self.tags), "weight": self.weight}


@dataclass(frozen=True)
class FewShot:
    """A worked example, shown to the model as earlier turns of the same conversation."""

    prompt: str
    response: str
    critique: str
    revision: str
    principle: str | None = None


@dataclass(frozen=True)
class Defaults:
    revisions: int = 1
    sampling: str = "random"


@dataclass(frozen=True)
class Constitution:
    name: str
    principles: tuple[Principle, ...]
    path: str
    sha256: str
    version: int = 1
    description: str = ""
    defaults: Defaults = Defaults()
    few_shot: tuple[FewShot, ...] = ()

    @property
    def ref(self) -> str:
        """`name@hash-prefix`: names this exact file content in every record."""
        return f"{self.name}@{self.sha256[:12]}"

    def principle(self, principle_id: str) -> Principle:
        for p in self.principles:
            if p.id == principle_id:
                return p
        raise KeyError(principle_id)

    def few_shot_principle(self, example: FewShot) -> Principle:
        return self.principle(example.principle) if example.principle else self.principles[0]


# --- validation --------------------------------------------------------------------------------

@dataclass
class _Field:
    kind: str                 # "str" | "int" | "number" | "list[str]" | "mapping" | "list"
    required: bool = False
    nonempty: bool = True
    help: str = ""
    schema: dict = field(default_factory=dict)    # extra JSON Schema keywords (enum, minimum…)


_TOP = {
    "name": _Field("str", required=True, help="Short id of this constitution; records carry name@sha256-prefix."),
    "version": _Field("int", help="Your own version number for this file.", schema={"minimum": 1}),
    "description": _Field("str", nonempty=False, help="One line on what this constitution is for."),
    "defaults": _Field("mapping", help="Run settings used when the command line does not give them."),
    "principles": _Field("list", required=True, help="The principles; each drives one critique → revise round."),
    "few_shot": _Field("list", help="Worked examples shown to the model as earlier turns of every conversation."),
}
_DEFAULTS = {
    "revisions": _Field("int", help="Critique → revise rounds per prompt (--revisions).", schema={"minimum": 1}),
    "sampling": _Field("str", help="random: one weighted draw per prompt; all: every principle, one record each; "
                                   "cycle: round robin (--sampling).", schema={"enum": list(SAMPLING_MODES)}),
}
_PRINCIPLE = {
    "id": _Field("str", required=True, help="Unique slug: lowercase letters, digits and '-'.",
                 schema={"pattern": SLUG.pattern}),
    "critique": _Field("str", required=True, help="The request that asks the model to critique its last response."),
    "revision": _Field("str", required=True, help="The request that asks the model to rewrite its last response."),
    "choice": _Field("str", help="Question a judge model answers when comparing two responses."),
    "tags": _Field("list[str]", nonempty=False, help="Free labels for grouping and reports."),
    "weight": _Field("number", help="Relative chance of being drawn by random sampling (> 0).",
                     schema={"exclusiveMinimum": 0}),
}
_FEW_SHOT = {
    "prompt": _Field("str", required=True, help="The user's request."),
    "response": _Field("str", required=True, help="A first answer (becomes the rejected side in spirit)."),
    "critique": _Field("str", required=True, help="A critique of that answer under the principle."),
    "revision": _Field("str", required=True, help="The rewritten answer alone, with no preamble."),
    "principle": _Field("str", help="Id of the principle this example demonstrates (default: the first).",
                        schema={"pattern": SLUG.pattern}),
}


def _object_schema(spec: dict[str, _Field], items: dict[str, dict] | None = None) -> dict:
    props = {}
    for key, rule in spec.items():
        if key in (items or {}):
            prop = items[key]
        elif rule.kind == "str":
            prop = {"type": "string", **({"minLength": 1} if rule.nonempty else {})}
        elif rule.kind == "int":
            prop = {"type": "integer"}
        elif rule.kind == "number":
            prop = {"type": "number"}
        else:  # list[str]
            prop = {"type": "array", "items": {"type": "string"}}
        props[key] = {"description": rule.help, **prop, **rule.schema}
    required = [k for k, rule in spec.items() if rule.required]
    return {"type": "object", "additionalProperties": False, "properties": props,
            **({"required": required} if required else {})}


def json_schema() -> dict:
    """JSON Schema of the constitution format, built from the same field specs as validation,
    so editors (yaml-language-server) check exactly what `cai` checks, bar cross-references."""
    schema = _object_schema(_TOP, items={
        "defaults": _object_schema(_DEFAULTS),
        "principles": {"type": "array", "minItems": 1, "items": _object_schema(_PRINCIPLE)},
        "few_shot": {"type": "array", "minItems": 1, "items": _object_schema(_FEW_SHOT)},
    })
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "cai constitution", **schema}


@dataclass
class Problem:
    line: int
    column: int
    field: str | None
    message: str


@dataclass
class _Checker:
    path: str
    problems: list[Problem] = field(default_factory=list)

    def add(self, node: yaml.Node, message: str, field_path: str | None = None) -> None:
        mark = node.start_mark
        self.problems.append(Problem(mark.line + 1, mark.column + 1, field_path, message))

    def mapping(self, node: yaml.Node, spec: dict[str, _Field], where: str) -> dict[str, Any]:
        """Check a mapping node against `spec`; return {key: value} for keys that passed."""
        if not isinstance(node, yaml.MappingNode):
            self.add(node, f"expected a mapping, got {_kind(node)}", where or None)
            return {}
        values: dict[str, Any] = {}
        seen: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            full = f"{where}.{key}" if where else str(key)
            if key in seen:
                self.add(key_node, f"duplicate key (first at line {seen[key].start_mark.line + 1})", full)
                continue
            seen[key] = key_node
            if key not in spec:
                hint = difflib.get_close_matches(str(key), spec, n=1)
                extra = f"; did you mean '{hint[0]}'?" if hint else f"; allowed: {', '.join(spec)}"
                self.add(key_node, f"unknown key{extra}", full)
                continue
            ok, value = self.value(value_node, spec[key], full)
            if ok:
                values[key] = (value, value_node)
        for key, rule in spec.items():
            if rule.required and key not in seen:
                self.add(node, "missing required key", f"{where}.{key}" if where else key)
        return values

    def value(self, node: yaml.Node, rule: _Field, where: str) -> tuple[bool, Any]:
        if not node.tag.startswith("tag:yaml.org,2002:") or node.tag.rsplit(":", 1)[-1] not in _PLAIN_TAGS:
            self.add(node, f"unsupported YAML tag '{node.tag}'; only plain values are allowed", where)
            return False, None
        if rule.kind in ("mapping", "list"):
            want = yaml.MappingNode if rule.kind == "mapping" else yaml.SequenceNode
            if not isinstance(node, want):
                self.add(node, f"expected a {'mapping' if rule.kind == 'mapping' else 'list'}, got {_kind(node)}", where)
                return False, None
            if rule.kind == "list" and not node.value:
                self.add(node, "must not be empty", where)
                return False, None
            return True, node
        if rule.kind == "list[str]":
            if not isinstance(node, yaml.SequenceNode):
                self.add(node, f"expected a list of strings, got {_kind(node)}", where)
                return False, None
            items = []
            for i, item in enumerate(node.value):
                ok, v = self.value(item, _Field("str"), f"{where}[{i}]")
                if not ok:
                    return False, None
                items.append(v)
            return True, tuple(items)
        if not isinstance(node, yaml.ScalarNode):
            self.add(node, f"expected {_article(rule.kind)}, got {_kind(node)}", where)
            return False, None
        value = _construct(node)
        if rule.kind == "str":
            if not isinstance(value, str) or node.tag != "tag:yaml.org,2002:str":
                self.add(node, f"expected a string, got {_kind(node)}", where)
                return False, None
            if rule.nonempty and not value.strip():
                self.add(node, "must not be empty", where)
                return False, None
            return True, value.strip()
        if rule.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                self.add(node, f"expected an integer, got {_kind(node)}", where)
                return False, None
            return True, value
        if rule.kind == "number":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self.add(node, f"expected a number, got {_kind(node)}", where)
                return False, None
            return True, float(value)
        raise AssertionError(rule.kind)


_PLAIN_TAGS = ("str", "int", "float", "bool", "null", "map", "seq")


def _construct(node: yaml.ScalarNode) -> Any:
    return yaml.SafeLoader("").construct_object(node)


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    tag = node.tag.rsplit(":", 1)[-1]
    if tag == "null" or node.value in ("", "~", "null"):
        return "nothing (empty value)"
    names = {"str": "a string", "int": "an integer", "float": "a number", "bool": "a boolean"}
    return names.get(tag, f"a {tag}")


def _article(kind: str) -> str:
    return {"str": "a string", "int": "an integer", "number": "a number"}.get(kind, kind)


def parse_constitution(text: str | bytes, path: str = "<string>") -> Constitution:
    """Parse and validate constitution text. Raises ConstitutionError listing every problem."""
    raw = text.encode("utf-8") if isinstance(text, str) else text
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConstitutionError(path, "file is not valid UTF-8", line=line) from None
    checker = _Checker(path)
    try:
        root = yaml.compose(decoded, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = (exc.problem or exc.context or "invalid YAML").strip()
        if "\t" in message or "'\\t'" in message:
            message = "tab character; indent YAML with spaces"
        elif exc.context and exc.context_mark and exc.problem_mark and exc.context_mark.line != exc.problem_mark.line:
            message += f" {exc.context} that starts at line {exc.context_mark.line + 1}"
        line = mark.line + 1 if mark else None
        column = mark.column + 1 if mark else None
        raise ConstitutionError(path, f"YAML syntax error: {message}", line=line, column=column) from None
    if root is None:
        raise ConstitutionError(path, "file is empty; a constitution needs a name and principles", line=1)
    top = checker.mapping(root, _TOP, "")

    defaults = Defaults()
    if "defaults" in top:
        values = checker.mapping(top["defaults"][0], _DEFAULTS, "defaults")
        revisions = values.get("revisions", (1, None))
        sampling = values.get("sampling", ("random", None))
        if revisions[1] is not None and revisions[0] < 1:
            checker.add(revisions[1], "must be at least 1", "defaults.revisions")
        if sampling[1] is not None and sampling[0] not in SAMPLING_MODES:
            checker.add(sampling[1], f"must be one of {', '.join(SAMPLING_MODES)}", "defaults.sampling")
        defaults = Defaults(revisions=max(1, revisions[0]), sampling=sampling[0])

    principles: list[Principle] = []
    first_line: dict[str, int] = {}
    if "principles" in top:
        for i, item in enumerate(top["principles"][0].value):
            where = f"principles[{i}]"
            values = checker.mapping(item, _PRINCIPLE, where)
            if not {"id", "critique", "revision"} <= values.keys():
                continue
            pid, id_node = values["id"]
            if not SLUG.match(pid):
                checker.add(id_node, "must be a slug: lowercase letters, digits and '-' (e.g. 'harmful-content')", f"{where}.id")
                continue
            if pid in first_line:
                checker.add(id_node, f"duplicate principle id '{pid}' (first at line {first_line[pid]})", f"{where}.id")
                continue
            first_line[pid] = id_node.start_mark.line + 1
            weight = values.get("weight", (1.0, None))
            if weight[1] is not None and not weight[0] > 0:
                checker.add(weight[1], "must be greater than 0", f"{where}.weight")
                continue
            principles.append(Principle(
                id=pid, critique=values["critique"][0], revision=values["revision"][0],
                choice=values.get("choice", (None,))[0], tags=values.get("tags", ((),))[0],
                weight=weight[0]))

    if "version" in top and top["version"][0] < 1:
        checker.add(top["version"][1], "must be at least 1", "version")

    few_shot: list[FewShot] = []
    if "few_shot" in top:
        for i, item in enumerate(top["few_shot"][0].value):
            where = f"few_shot[{i}]"
            values = checker.mapping(item, _FEW_SHOT, where)
            if not {"prompt", "response", "critique", "revision"} <= values.keys():
                continue
            ref = values.get("principle")
            if ref and ref[0] not in first_line:
                checker.add(ref[1], f"no principle with id '{ref[0]}'", f"{where}.principle")
                continue
            few_shot.append(FewShot(**{k: v for k, (v, _) in values.items()}))

    if checker.problems:
        first = checker.problems[0]
        more = len(checker.problems) - 1
        message = first.message + (f" (and {more} more: cai constitution validate {path})" if more else "")
        error = ConstitutionError(path, message, line=first.line, column=first.column, field=first.field)
        error.problems = [ConstitutionError(path, p.message, line=p.line, column=p.column, field=p.field)
                          for p in checker.problems]
        raise error
    return Constitution(
        name=top["name"][0], principles=tuple(principles), path=path,
        sha256=hashlib.sha256(raw).hexdigest(), version=top.get("version", (1,))[0],
        description=top.get("description", ("",))[0], defaults=defaults, few_shot=tuple(few_shot))


def shipped_constitutions() -> dict[str, Path]:
    return {p.stem: p for p in sorted(data_dir("constitutions").glob("*.yaml"))}


def starter_text() -> str:
    """The `minimal` constitution with its schema comment pointing at the installed schema, as
    the starting point of `cai constitution init`."""
    folder = data_dir("constitutions")
    text = (folder / "minimal.yaml").read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    if lines and lines[0].startswith("# yaml-language-server:"):
        lines[0] = f"# yaml-language-server: $schema={(folder / 'schema.json').as_uri()}\n"
    return "".join(lines).replace("name: minimal\n", "name: my-constitution\n", 1)


def resolve_constitution_path(spec: str) -> Path:
    """A shipped name (`harmless`) or a path to a YAML file."""
    path = Path(spec).expanduser()
    if path.suffix in (".yaml", ".yml") or "/" in spec or path.exists():
        if path.is_dir():
            raise ConstitutionError(spec, "is a directory, not a constitution file")
        if not path.exists():
            raise ConstitutionError(spec, "no such file")
        return path
    shipped = shipped_constitutions()
    if spec in shipped:
        return shipped[spec]
    hint = difflib.get_close_matches(spec, shipped, n=1)
    extra = f"did you mean '{hint[0]}'? " if hint else ""
    raise ConstitutionError(spec, f"no such constitution; {extra}shipped: {', '.join(shipped)} (or give a path to a .yaml file)")


def load_constitution(spec: str) -> Constitution:
    path = resolve_constitution_path(spec)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConstitutionError(spec, f"cannot read: {exc.strerror}") from None
    return parse_constitution(raw, str(path))


# --- sampling principles -----------------------------------------------------------------------

def plan_principles(constitution: Constitution, prompt_id: str, index: int, rounds: int,
                    mode: str, seed: int) -> list[list[Principle]]:
    """The principles for each record made from one prompt: one list of `rounds` principles per
    record. `random` and `cycle` make one record per prompt, `all` one per principle. Choices
    depend only on (seed, prompt id, position), so a resumed or re-batched run picks the same."""
    principles = list(constitution.principles)
    if mode == "cycle":
        n = len(principles)
        return [[principles[(index * rounds + r) % n] for r in range(rounds)]]
    rng = random.Random(f"{seed}\x1f{prompt_id}")
    if mode == "random":
        return [_draw(rng, principles, rounds, first=None)]
    if mode == "all":
        return [_draw(rng, principles, rounds, first=p) for p in principles]
    raise ValueError(f"unknown sampling mode {mode!r}")


def _draw(rng: random.Random, principles: list[Principle], rounds: int,
          first: Principle | None) -> list[Principle]:
    """Weighted draws without repeats until every principle has been used once."""
    chosen: list[Principle] = [first] if first else []
    pool = [p for p in principles if p is not first]
    while len(chosen) < rounds:
        if not pool:
            pool = [p for p in principles if p is not chosen[-1]] or list(principles)
        pick = rng.choices(pool, weights=[p.weight for p in pool])[0]
        pool.remove(pick)
        chosen.append(pick)
    return chosen
