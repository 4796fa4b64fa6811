"""The constitution format: one spec per field (kind, required, help), which the YAML checker
(validate.py) enforces and `json_schema()` publishes, so editors check what `cai` checks."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cai.constitution.sampling import SAMPLING_MODES

SLUG = re.compile(r"^[a-z0-9]+(?:[-_][a-z0-9]+)*$")


@dataclass
class FieldSpec:
    kind: str                 # "str" | "int" | "number" | "list[str]" | "mapping" | "list"
    required: bool = False
    nonempty: bool = True
    help: str = ""
    schema: dict = field(default_factory=dict)    # extra JSON Schema keywords (enum, minimum…)


TOP_FIELDS = {
    "name": FieldSpec("str", required=True, help="Short id of this constitution; records carry name@sha256-prefix."),
    "version": FieldSpec("int", help="Your own version number for this file.", schema={"minimum": 1}),
    "description": FieldSpec("str", nonempty=False, help="One line on what this constitution is for."),
    "defaults": FieldSpec("mapping", help="Run settings used when the command line does not give them."),
    "principles": FieldSpec("list", required=True, help="The principles; each drives one critique → revise round."),
    "few_shot": FieldSpec("list", help="Worked examples shown to the model as earlier turns of every conversation."),
    "feedback_examples": FieldSpec("list", help="Worked comparisons shown to the feedback model (cai generate "
                                                "--samples) as earlier turns of every comparison."),
}
DEFAULTS_FIELDS = {
    "revisions": FieldSpec("int", help="Critique → revise rounds per prompt (--revisions).", schema={"minimum": 1}),
    "sampling": FieldSpec("str", help="random: one weighted draw per prompt; all: every principle, one record each; "
                                   "cycle: round robin (--sampling).", schema={"enum": list(SAMPLING_MODES)}),
}
PRINCIPLE_FIELDS = {
    "id": FieldSpec("str", required=True, help="Unique slug: lowercase letters, digits and '-'.",
                 schema={"pattern": SLUG.pattern}),
    "critique": FieldSpec("str", required=True, help="The request that asks the model to critique its last response."),
    "revision": FieldSpec("str", required=True, help="The request that asks the model to rewrite its last response."),
    "choice": FieldSpec("str", help="Question a judge model answers when comparing two responses."),
    "tags": FieldSpec("list[str]", nonempty=False, help="Free labels for grouping and reports."),
    "weight": FieldSpec("number", help="Relative chance of being drawn by random sampling (> 0).",
                     schema={"exclusiveMinimum": 0}),
}
FEW_SHOT_FIELDS = {
    "prompt": FieldSpec("str", required=True, help="The user's request."),
    "response": FieldSpec("str", required=True, help="A first answer (becomes the rejected side in spirit)."),
    "critique": FieldSpec("str", required=True, help="A critique of that answer under the principle."),
    "revision": FieldSpec("str", required=True, help="The rewritten answer alone, with no preamble."),
    "principle": FieldSpec("str", help="Id of the principle this example demonstrates (default: the first).",
                        schema={"pattern": SLUG.pattern}),
}

FEEDBACK_FIELDS = {
    "prompt": FieldSpec("str", required=True, help="The user's request."),
    "a": FieldSpec("str", required=True, help="The answer shown as option (A)."),
    "b": FieldSpec("str", required=True, help="The answer shown as option (B)."),
    "answer": FieldSpec("str", required=True, help="The better option: A or B.", schema={"enum": ["A", "B"]}),
    "principle": FieldSpec("str", help="Id of the principle whose `choice` question is asked (default: the question "
                                       "below, else a generic one).", schema={"pattern": SLUG.pattern}),
    "question": FieldSpec("str", help="The question asked, where no principle is named."),
    "reasoning": FieldSpec("str", help="Step-by-step reasoning before the answer, shown with --cot."),
}


def _object_schema(spec: dict[str, FieldSpec], items: dict[str, dict] | None = None) -> dict:
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
    schema = _object_schema(TOP_FIELDS, items={
        "defaults": _object_schema(DEFAULTS_FIELDS),
        "principles": {"type": "array", "minItems": 1, "items": _object_schema(PRINCIPLE_FIELDS)},
        "few_shot": {"type": "array", "minItems": 1, "items": _object_schema(FEW_SHOT_FIELDS)},
        "feedback_examples": {"type": "array", "minItems": 1, "items": _object_schema(FEEDBACK_FIELDS)},
    })
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "cai constitution", **schema}
