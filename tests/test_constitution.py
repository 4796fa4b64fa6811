"""Constitution loading, validation messages with file:line:column, and principle sampling."""

from __future__ import annotations

import pytest

from cai.constitution import (load_constitution, parse_constitution, plan_principles,
                              shipped_constitutions)
from cai.errors import ConstitutionError
from conftest import DATA

VALID = """\
name: t
principles:
  - id: a
    critique: Critique A.
    revision: Revise A.
  - id: b
    critique: Critique B.
    revision: Revise B.
    weight: 3
few_shot:
  - principle: b
    prompt: P
    response: R
    critique: C
    revision: V
"""


def test_shipped_constitutions_load():
    shipped = shipped_constitutions()
    assert "harmless" in shipped
    harmless = load_constitution("harmless")
    assert len(harmless.principles) >= 12
    assert len({p.id for p in harmless.principles}) == len(harmless.principles)
    assert harmless.ref.startswith("harmless@") and len(harmless.ref) == len("harmless@") + 12


def test_valid_file_parses_into_typed_objects():
    c = parse_constitution(VALID, "t.yaml")
    assert [p.id for p in c.principles] == ["a", "b"]
    assert c.principles[1].weight == 3.0
    assert c.few_shot[0].principle == "b"
    assert c.few_shot_principle(c.few_shot[0]).id == "b"
    assert c.defaults.revisions == 1 and c.defaults.sampling == "random"


@pytest.mark.parametrize("text, where, message", [
    ("name: t\nprinciples: []\n", "t.yaml:2:13", "principles: must not be empty"),
    ("principles:\n  - id: a\n    critique: c\n    revision: r\n", "t.yaml:1:1", "name: missing required key"),
    ("name: t\nprinciples:\n  - id: a\n    critique: c\n", "t.yaml:3:5", "principles[0].revision: missing required key"),
    ("name: t\nprinciples:\n  - id: Bad Id\n    critique: c\n    revision: r\n", "t.yaml:3:9", "must be a slug"),
    ("name: t\nprinciples:\n  - id: a\n    critique: c\n    revision: r\n  - id: a\n    critique: c\n    revision: r\n",
     "t.yaml:6:9", "duplicate principle id 'a' (first at line 3)"),
    ("name: t\nprinciples:\n  - id: a\n    critique: c\n    revision: r\n    weight: 0\n", "t.yaml:6:13", "must be greater than 0"),
    ("name: t\nprinciples:\n  - id: a\n    critique: [c]\n    revision: r\n", "t.yaml:4:15", "expected a string, got a list"),
    ("name: t\nname: u\nprinciples:\n  - id: a\n    critique: c\n    revision: r\n", "t.yaml:2:1", "name: duplicate key"),
    ("name: t\nprinciples:\n\t- id: a\n", "t.yaml:3:1", "tab character"),
    ("- just\n- a list\n", "t.yaml:1:1", "expected a mapping"),
    ("name: t\ndefaults:\n  sampling: sometimes\nprinciples:\n  - id: a\n    critique: c\n    revision: r\n",
     "t.yaml:3:13", "must be one of random, all, cycle"),
    ("name: t\nprinciples:\n  - id: a\n    critique: c\n    revision: r\nfew_shot:\n  - principle: zz\n    prompt: p\n    response: r\n    critique: c\n    revision: v\n",
     "t.yaml:7:16", "no principle with id 'zz'"),
    ("name: !!python/object:os.system x\nprinciples: []\n", "t.yaml:1:7", "unsupported YAML tag"),
])
def test_errors_name_file_line_and_column(text, where, message):
    with pytest.raises(ConstitutionError) as info:
        parse_constitution(text, "t.yaml")
    assert str(info.value).startswith(where + ":"), str(info.value)
    assert message in str(info.value)


def test_every_problem_is_reported_at_once():
    text = "name: t\nprinciples:\n  - id: a\n    critque: c\n  - id: b\n    critique: c\n    revision: r\n    weigth: 2\n"
    with pytest.raises(ConstitutionError) as info:
        parse_constitution(text, "t.yaml")
    found = [(p.line, p.field) for p in info.value.problems]
    assert (4, "principles[0].critque") in found
    assert (3, "principles[0].critique") in found
    assert (8, "principles[1].weigth") in found


def test_non_utf8_file(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_bytes(b"name: t\ndescription: caf\xe9\n")
    with pytest.raises(ConstitutionError, match=r"x.yaml:2: file is not valid UTF-8"):
        load_constitution(str(path))


def test_sampling_is_seeded_per_prompt_and_avoids_repeats():
    c = load_constitution(str(DATA / "three.yaml"))
    a = plan_principles(c, "prompt-1", 0, 3, "random", seed=1)
    assert a == plan_principles(c, "prompt-1", 5, 3, "random", seed=1), "choice depends on id, not position"
    assert len({p.id for p in a[0]}) == 3
    draws = {plan_principles(c, f"p{i}", i, 1, "random", seed=0)[0][0].id for i in range(50)}
    assert draws == {"be-kind", "be-safe", "be-brief"}
    cycle = [plan_principles(c, f"p{i}", i, 1, "cycle", seed=0)[0][0].id for i in range(4)]
    assert cycle == ["be-kind", "be-safe", "be-brief", "be-kind"]
    every = plan_principles(c, "p", 0, 2, "all", seed=0)
    assert [plan[0].id for plan in every] == ["be-kind", "be-safe", "be-brief"]
    assert all(plan[0].id != plan[1].id for plan in every)


def test_weights_shape_random_choice():
    c = load_constitution(str(DATA / "three.yaml"))
    counts = {"be-kind": 0, "be-safe": 0, "be-brief": 0}
    for i in range(2000):
        counts[plan_principles(c, f"p{i}", i, 1, "random", seed=0)[0][0].id] += 1
    assert counts["be-safe"] > 1.6 * counts["be-kind"]     # weight 2 vs 1
