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


# ---- issue 31: weights that sampling cannot use, hostile YAML, merge keys ----

@pytest.mark.parametrize("weights, where, message", [
    ([".inf"], "t.yaml:6:13", "principles[0].weight: must be a finite number (got .inf)"),
    ([".nan"], "t.yaml:6:13", "principles[0].weight: must be a finite number (got .nan)"),
    (["-.inf"], "t.yaml:6:13", "principles[0].weight: must be a finite number (got -.inf)"),
    (["1.0e+308", "1.0e+308"], "t.yaml:10:13", "principles[1].weight: the weights add up to more than the largest number"),
])
def test_weights_must_be_finite_and_add_up_to_a_finite_total(weights, where, message):
    text = "name: t\nprinciples:\n" + "".join(
        f"  - id: p{i}\n    critique: c\n    revision: r\n    weight: {w}\n" for i, w in enumerate(weights))
    with pytest.raises(ConstitutionError) as info:
        parse_constitution(text, "t.yaml")
    assert str(info.value).startswith(f"{where}: {message}"), str(info.value)
    # sampling draws in proportion to the total: large weights whose sum stays finite are fine
    fine = parse_constitution(text.replace("1.0e+308", "8.0e+307"), "t.yaml") if len(weights) == 2 else None
    if fine is not None:
        plan_principles(fine, "p", 0, 2, "random", seed=0)


@pytest.mark.parametrize("text, where, message", [
    ("[" * 5000 + "]" * 5000, "t.yaml:1:65", "YAML nested too deeply (more than 64 levels"),
    ("{a: " * 5000 + "1" + "}" * 5000, "t.yaml:1:", "YAML nested too deeply"),
    ("".join("  " * i + f"k{i}:\n" for i in range(200)) + "  " * 200 + "x\n", "t.yaml:64:127", "YAML nested too deeply"),
    ("name: t\nversion: " + "9" * 5000 + "\nprinciples: []\n", "t.yaml:2:10", "version: an integer of 5,000 digits is too long"),
    ("name: !!int abc\nprinciples: []\n", "t.yaml:1:7", "name: 'abc' is not a valid int value"),
    ("name: t\nprinciples:\n  - id: a\n    critique: c\n    revision: r\n    weight: !!bool maybe\n", "t.yaml:6:13",
     "principles[0].weight: 'maybe' is not a valid bool value"),
    ("!!python/object:os.system\nname: t\nprinciples: []\n", "t.yaml:1:1", "unsupported YAML tag"),
    ("name: t\nprinciples:\n  - !!set {id: a}\n", "t.yaml:3:5", "principles[0]: unsupported YAML tag"),
])
def test_hostile_yaml_is_one_error_not_a_traceback(text, where, message):
    with pytest.raises(ConstitutionError) as info:
        parse_constitution(text, "t.yaml")
    assert str(info.value).startswith(where), str(info.value)
    assert message in str(info.value)


def test_alias_and_merge_bombs_are_refused_at_once(monkeypatch):
    import time

    from cai.constitution import validate

    laughs = "".join(f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    start = time.monotonic()
    with pytest.raises(ConstitutionError) as info:
        parse_constitution('a: &a ["lol", "lol"]\n' + laughs + "name: t\nprinciples:\n  - id: x\n    critique: c\n"
                           "    revision: r\n    tags: *i\n", "t.yaml")
    assert "principles[0].tags[0]: expected a string, got a list" in str(info.value.problems[-1])
    # text that aliases repeat past the limit, and merge keys that bring in too many keys
    monkeypatch.setattr(validate, "MAX_EXPANDED", 1000)
    text = "name: &n " + "x" * 100 + "\nprinciples:\n  - id: a\n    critique: c\n    revision: r\n    tags: [" \
        + ", ".join(["*n"] * 20) + "]\n"
    with pytest.raises(ConstitutionError, match=r"^t.yaml:1:7: aliases expand this file past"):
        parse_constitution(text, "t.yaml")
    monkeypatch.setattr(validate, "MAX_MERGED", 50)
    base = "  - &m\n    id: a\n    critique: c\n    revision: r\n" + "".join(f"    k{i}: 1\n" for i in range(10))
    text = "name: t\nprinciples:\n" + base + "".join(f"  - <<: *m\n    id: p{i}\n" for i in range(10))
    with pytest.raises(ConstitutionError, match=r"merge keys \(<<\) bring in more than 50 keys"):
        parse_constitution(text, "t.yaml")
    assert time.monotonic() - start < 10


def test_a_file_over_the_size_limit_is_refused_without_parsing_it(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_bytes(b"name: t\n" + b"# " + b"x" * (1 << 20) + b"\n")
    with pytest.raises(ConstitutionError, match=r"big.yaml: file is larger than 1 MiB"):
        load_constitution(str(path))


MERGED = """\
name: merged
principles:
  - &base
    id: kind
    critique: Is the answer unkind?
    revision: Rewrite it kindly.
    tags: [tone]
    weight: 2
  - <<: *base
    id: brief
    critique: Is it too long?
  - &extra
    <<: [*base]
    id: plain
    revision: Rewrite it plainly.
    choice: Which is plainer?
  - <<: [*extra, *base]
    id: both
few_shot:
  - &shot
    principle: brief
    prompt: P
    response: R
    critique: C
    revision: V
  - <<: *shot
    prompt: Q
"""


def test_merge_keys_are_taken_as_if_written_out():
    c = parse_constitution(MERGED, "m.yaml")
    by_id = {p.id: p for p in c.principles}
    assert list(by_id) == ["kind", "brief", "plain", "both"]
    assert by_id["brief"].critique == "Is it too long?" and by_id["brief"].revision == "Rewrite it kindly."
    assert by_id["brief"].tags == ("tone",) and by_id["brief"].weight == 2.0
    assert by_id["plain"].revision == "Rewrite it plainly." and by_id["plain"].choice == "Which is plainer?"
    # the first mapping of a merge list wins, then the next (a merged mapping's own merges included)
    assert by_id["both"].revision == "Rewrite it plainly." and by_id["both"].critique == "Is the answer unkind?"
    assert [(s.prompt, s.principle) for s in c.few_shot] == [("P", "brief"), ("Q", "brief")]


def test_problems_in_merged_content_point_at_where_it_is_written():
    text = ("name: t\nprinciples:\n  - &base\n    id: a\n    critique: c\n    revison: r\n"
            "  - <<: *base\n    id: b\n    weigth: 2\n")
    with pytest.raises(ConstitutionError) as info:
        parse_constitution(text, "t.yaml")
    found = {(p.line, p.column, p.field, p.detail.split(";")[0]) for p in info.value.problems}
    assert (6, 5, "principles[0].revison", "unknown key") in found
    assert (6, 5, "principles[1].revison", "unknown key") in found       # merged: where it is written
    assert (9, 5, "principles[1].weigth", "unknown key") in found
    assert (7, 5, "principles[1].revision", "missing required key") in found
    assert not any(p.field and p.field.endswith("<<") for p in info.value.problems)
    # a mapping that merges itself, and a merge of a string, are one problem each
    for bad, message in (("  - &loop\n    <<: *loop\n    id: a\n    critique: c\n    revision: r\n", "merges itself"),
                         ("  - <<: *n\n    id: a\n    critique: c\n    revision: r\n", "takes a mapping or a list")):
        with pytest.raises(ConstitutionError, match=message):
            parse_constitution("name: &n t\nprinciples:\n" + bad, "t.yaml")
