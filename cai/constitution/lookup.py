"""Finding a constitution: shipped ones by name, or a path to a YAML file; loading it; and the
starter file of `cai constitution init`."""

from __future__ import annotations

import difflib
from pathlib import Path

from cai.constitution.model import Constitution
from cai.constitution.validate import MAX_BYTES, TOO_LARGE, parse_constitution
from cai.errors import ConstitutionError
from cai.shipped import data_dir


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
    return "".join(lines).replace("name: minimal\n", "name: my-constitution\n", 1) + STARTER_FEEDBACK


# the starter's worked comparison for the feedback model (`cai generate --samples`)
STARTER_FEEDBACK = """
# feedback_examples: worked comparisons shown to the feedback model of `cai generate --samples`
# (the paper's second stage) before every comparison it makes. Each shows a prompt, two answers
# (a: option A, b: option B), and the better one (answer: A or B). `principle` names whose
# `choice` question is asked (or give `question`); `reasoning` is shown before the answer with
# --cot. Optional; keep them short: they lengthen every comparison.
feedback_examples:
  - principle: be-honest
    prompt: How many moons does Mars have?
    a: Mars has two small moons, Phobos and Deimos.
    b: Mars has no moons at all.
    reasoning: Mars has two moons, Phobos and Deimos. Option A says so; option B is false.
    answer: A
"""


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
        with path.open("rb") as fp:
            raw = fp.read(MAX_BYTES + 1)        # no more: a huge file is refused, not read whole
    except OSError as exc:
        raise ConstitutionError(spec, f"cannot read: {exc.strerror}") from None
    if len(raw) > MAX_BYTES:
        raise ConstitutionError(str(path), TOO_LARGE)
    return parse_constitution(raw, str(path))
