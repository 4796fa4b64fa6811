"""Parsing and validating constitution YAML: every problem found, each with file:line:column
and the field's path, against the field specs of schema.py.

Hostile YAML is refused with one line rather than a traceback or a hang: a file over MAX_BYTES,
nesting deeper than MAX_DEPTH (the composer recurses), aliases that expand past MAX_EXPANDED
characters of text or merge keys past MAX_MERGED entries (a "billion laughs"), tags other than
the plain ones, and scalars that do not construct (`!!int abc`, a 5,000-digit integer). Merge
keys (`<<: *anchor`, `<<: [*a, *b]`) are taken as YAML 1.1 defines them: the merged keys are
checked as if written out, keys written in the mapping win, and a problem in merged content
points at where it is written (the anchor's mapping)."""

from __future__ import annotations

import difflib
import hashlib
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import yaml

from cai.constitution.model import Constitution, Defaults, FeedbackExample, FewShot, Principle
from cai.constitution.sampling import MAX_REVISIONS, SAMPLING_MODES
from cai.constitution.schema import DEFAULTS_FIELDS, FEEDBACK_FIELDS, FEW_SHOT_FIELDS, PRINCIPLE_FIELDS, SLUG, TOP_FIELDS, FieldSpec
from cai.errors import ConstitutionError


MAX_BYTES = 1 << 20            # a constitution is a few KB; PyYAML reads ~100-200 KB/s of pure Python
MAX_DEPTH = 64                 # nesting of lists and mappings (a constitution needs 3)
MAX_EXPANDED = 16 << 20        # characters of text once aliases are followed
MAX_MERGED = 100_000           # keys taken through merge keys, all mappings together
MERGE_TAG = "tag:yaml.org,2002:merge"
TOO_LARGE = f"file is larger than {MAX_BYTES >> 20} MiB; a constitution is a few KB (is this the right file?)"


class _TooDeep(Exception):
    def __init__(self, mark):
        super().__init__("nested too deeply")
        self.mark = mark


class _Loader(yaml.SafeLoader):
    """The safe composer, refusing nesting deeper than MAX_DEPTH before Python's recursion limit
    (the composer recurses once per level) turns it into a RecursionError."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _TooDeep(self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _Expanded(Exception):
    """Aliases or merge keys expand the file past a limit (raised at the node that crossed it)."""

    def __init__(self, node: yaml.Node, message: str):
        super().__init__(message)
        self.node, self.message = node, message


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
    expanded: int = 0                   # characters of text taken so far, aliases followed
    merged: int = 0                     # keys taken through merge keys so far
    _pairs: dict[int, list] = field(default_factory=dict)      # id(mapping node) → its pairs, merges resolved
    _merging: set[int] = field(default_factory=set)

    def add(self, node: yaml.Node, message: str, field_path: str | None = None) -> None:
        mark = node.start_mark
        self.problems.append(Problem(mark.line + 1, mark.column + 1, field_path, message))

    def mapping(self, node: yaml.Node, spec: dict[str, FieldSpec], where: str) -> dict[str, Any]:
        """Check a mapping node against `spec`; return {key: value} for keys that passed."""
        if not isinstance(node, yaml.MappingNode):
            self.add(node, f"expected a mapping, got {_kind(node)}", where or None)
            return {}
        if not self.plain_tag(node, where or None):
            return {}
        values: dict[str, Any] = {}
        seen: dict[str, yaml.Node] = {}
        for key_node, value_node, merged in self.pairs(node, where, 0):
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if merged and key in seen:
                continue                # a key written in the mapping (or merged earlier) wins
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

    def pairs(self, node: yaml.MappingNode, where: str, depth: int) -> list[tuple[yaml.Node, yaml.Node, bool]]:
        """(key, value, merged) of a mapping: the pairs written in it, then those its merge keys
        (`<<`) bring, earlier merged mappings first (YAML 1.1: written keys win, then the first
        merged mapping that has the key). Each mapping is resolved once, however often it is
        merged or aliased."""
        known = self._pairs.get(id(node))
        if known is not None:
            return known
        if id(node) in self._merging:
            self.add(node, "merges itself (a merge key's alias refers to a mapping that contains it)",
                     f"{where}.<<" if where else "<<")
            return []
        if depth > MAX_DEPTH:
            self.add(node, f"merge keys nested more than {MAX_DEPTH} deep", f"{where}.<<" if where else "<<")
            return []
        self._merging.add(id(node))
        written: list[tuple[yaml.Node, yaml.Node, bool]] = []
        sources: list[yaml.MappingNode] = []
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag == MERGE_TAG:
                merge_where = f"{where}.<<" if where else "<<"
                items = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for item in items:
                    if isinstance(item, yaml.MappingNode):
                        if all(item is not other for other in sources):
                            sources.append(item)
                    else:
                        self.add(key_node, "a merge key (<<) takes a mapping or a list of mappings, such as "
                                       f"*anchor or [*a, *b]; got {_kind(item)}", merge_where)
            else:
                written.append((key_node, value_node, False))
        result = list(written)
        for source in sources:
            for key_node, value_node, _ in self.pairs(source, where, depth + 1):
                self.merged += 1
                if self.merged > MAX_MERGED:
                    raise _Expanded(key_node, f"merge keys (<<) bring in more than {MAX_MERGED:,} keys; "
                                              "a constitution this large is not meant (a merge-key bomb?)")
                result.append((key_node, value_node, True))
        self._merging.discard(id(node))
        self._pairs[id(node)] = result
        return result

    def plain_tag(self, node: yaml.Node, where: str | None) -> bool:
        if not node.tag.startswith("tag:yaml.org,2002:") or node.tag.rsplit(":", 1)[-1] not in _PLAIN_TAGS:
            self.add(node, f"unsupported YAML tag '{node.tag}'; only plain values are allowed", where)
            return False
        return True

    def value(self, node: yaml.Node, rule: FieldSpec, where: str) -> tuple[bool, Any]:
        if not self.plain_tag(node, where):
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
                ok, v = self.value(item, FieldSpec("str"), f"{where}[{i}]")
                if not ok:
                    return False, None
                items.append(v)
            return True, tuple(items)
        if not isinstance(node, yaml.ScalarNode):
            self.add(node, f"expected {_article(rule.kind)}, got {_kind(node)}", where)
            return False, None
        try:
            value = _construct(node)
        except (ValueError, KeyError, yaml.YAMLError) as exc:
            self.add(node, _unconstructed(node, exc), where)
            return False, None
        if rule.kind == "str":
            if not isinstance(value, str) or node.tag != "tag:yaml.org,2002:str":
                self.add(node, f"expected a string, got {_kind(node)}", where)
                return False, None
            if rule.nonempty and not value.strip():
                self.add(node, "must not be empty", where)
                return False, None
            self.expanded += len(value)
            if self.expanded > MAX_EXPANDED:
                raise _Expanded(node, f"aliases expand this file past {MAX_EXPANDED >> 20} MiB of text "
                                      "(an alias bomb?)")
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
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if not math.isfinite(number):
                self.add(node, f"must be a finite number (got {node.value})", where)
                return False, None
            return True, number
        raise AssertionError(rule.kind)


_PLAIN_TAGS = ("str", "int", "float", "bool", "null", "map", "seq")


def _construct(node: yaml.ScalarNode) -> Any:
    return yaml.SafeLoader("").construct_object(node)


def _unconstructed(node: yaml.ScalarNode, exc: Exception) -> str:
    """Why a scalar with an explicit or implied tag does not make a value (`!!int abc`)."""
    tag = node.tag.rsplit(":", 1)[-1]
    if "digits" in str(exc):
        return f"an integer of {len(node.value):,} digits is too long"
    return f"'{_short(node.value)}' is not a valid {tag} value"


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


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
    if len(raw) > MAX_BYTES:
        raise ConstitutionError(path, TOO_LARGE)
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConstitutionError(path, "file is not valid UTF-8", line=line) from None
    checker = _Checker(path)
    try:
        root = yaml.compose(decoded, Loader=_Loader)
    except _TooDeep as exc:
        raise ConstitutionError(path, f"YAML nested too deeply (more than {MAX_DEPTH} levels of lists and "
                                      "mappings)", line=exc.mark.line + 1, column=exc.mark.column + 1) from None
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
    try:
        return _check(checker, root, raw, path)
    except _Expanded as exc:
        mark = exc.node.start_mark
        raise ConstitutionError(path, exc.message, line=mark.line + 1, column=mark.column + 1) from None


def _check(checker: _Checker, root: yaml.Node, raw: bytes, path: str) -> Constitution:
    top = checker.mapping(root, TOP_FIELDS, "")

    defaults = Defaults()
    if "defaults" in top:
        values = checker.mapping(top["defaults"][0], DEFAULTS_FIELDS, "defaults")
        revisions = values.get("revisions", (1, None))
        sampling = values.get("sampling", ("random", None))
        if revisions[1] is not None and revisions[0] < 1:
            checker.add(revisions[1], "must be at least 1", "defaults.revisions")
        elif revisions[1] is not None and revisions[0] > MAX_REVISIONS:
            checker.add(revisions[1], f"must be at most {MAX_REVISIONS} (got {revisions[0]})", "defaults.revisions")
        if sampling[1] is not None and sampling[0] not in SAMPLING_MODES:
            checker.add(sampling[1], f"must be one of {', '.join(SAMPLING_MODES)}", "defaults.sampling")
        defaults = Defaults(revisions=max(1, revisions[0]), sampling=sampling[0])

    principles: list[Principle] = []
    first_line: dict[str, int] = {}
    total_weight = 0.0
    if "principles" in top:
        for i, item in enumerate(top["principles"][0].value):
            where = f"principles[{i}]"
            values = checker.mapping(item, PRINCIPLE_FIELDS, where)
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
            total_weight += weight[0]
            if not math.isfinite(total_weight):      # random sampling draws in proportion to the total
                checker.add(weight[1] or id_node, "the weights add up to more than the largest number "
                            f"({sys.float_info.max:g}); use smaller weights (only their ratios matter)", f"{where}.weight")
                total_weight = 0.0
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
            values = checker.mapping(item, FEW_SHOT_FIELDS, where)
            if not {"prompt", "response", "critique", "revision"} <= values.keys():
                continue
            ref = values.get("principle")
            if ref and ref[0] not in first_line:
                checker.add(ref[1], f"no principle with id '{ref[0]}'", f"{where}.principle")
                continue
            few_shot.append(FewShot(**{k: v for k, (v, _) in values.items()}))

    feedback_examples: list[FeedbackExample] = []
    for i, item in enumerate(top["feedback_examples"][0].value if "feedback_examples" in top else ()):
        where = f"feedback_examples[{i}]"
        values = checker.mapping(item, FEEDBACK_FIELDS, where)
        if not {"prompt", "a", "b", "answer"} <= values.keys():
            continue
        answer, answer_node = values["answer"]
        if answer not in ("A", "B"):
            checker.add(answer_node, f"must be A or B (got '{_short(answer)}')", f"{where}.answer")
            continue
        ref = values.get("principle")
        if ref and ref[0] not in first_line:
            checker.add(ref[1], f"no principle with id '{ref[0]}'", f"{where}.principle")
            continue
        if ref and "question" in values:
            checker.add(values["question"][1], "give a principle (its `choice` is asked) or a question, not both",
                        f"{where}.question")
            continue
        feedback_examples.append(FeedbackExample(**{k: v for k, (v, _) in values.items()}))

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
        description=top.get("description", ("",))[0], defaults=defaults, few_shot=tuple(few_shot),
        feedback_examples=tuple(feedback_examples))


# The composer with the depth guard, for other YAML files cai reads (run configs: cai/runconfig.py).
GuardedLoader = _Loader
