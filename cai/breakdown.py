"""`cai stats --by principle|tag`: the figures of a run per principle, or per tag of the
constitution's principles, worst first (the groups that yield the fewest usable pairs).

Built from what `cai.stats.Stats` already holds per principle; a tag's row sums the rows of
the principles that carry it, so a principle with two tags counts in both."""

from __future__ import annotations

from collections import Counter

from cai.errors import OptionError

KEYS = ("principle", "tag")
UNTAGGED = "(untagged)"


def _num(value):
    from cai.stats import _num as num

    return num(value)


def _rate(part, whole):
    return _num(part / whole) if whole else None


def row(name: str, parts: list[dict]) -> dict:
    """One group's figures from the per-principle accumulators `parts` (Stats.principles values)."""
    kept = sum(p["kept"] for p in parts)
    dropped = sum(p["dropped"] for p in parts)
    judged = sum(p["judged"] for p in parts)
    order_pairs = sum(p["order_pairs"] for p in parts)
    reasons: Counter[str] = Counter()
    for p in parts:
        reasons.update(p["reasons"])
    return {
        "name": name, "kept": kept, "dropped": dropped, "total": kept + dropped,
        "kept_rate": _rate(kept, kept + dropped),
        "dropped_by_reason": dict(reasons.most_common()),
        "edit_distance_mean": _rate(sum(p["edit_sum"] for p in parts), kept),
        "refusals": sum(p["refusals"] for p in parts),
        "chosen_words_mean": _rate(sum(p["chosen_words"] for p in parts), kept),
        "rejected_words_mean": _rate(sum(p["rejected_words"] for p in parts), kept),
        "judged": judged, "judge_mean": _rate(sum(p["preference_sum"] for p in parts), judged),
        "agreement": _rate(sum(p["agreeing"] for p in parts), order_pairs),
    }


def worst_first(rows: list[dict]) -> list[dict]:
    """Lowest kept rate first; among equals the bigger group, then by name."""
    return sorted(rows, key=lambda r: (r["kept_rate"] if r["kept_rate"] is not None else 2, -r["total"], r["name"]))


def constitution_for(spec, stats):
    """The constitution that maps principles to tags: the one named, else the shipped one the
    records name (the name part of meta.constitution)."""
    from cai.constitution import load_constitution, shipped_constitutions

    if spec:
        return load_constitution(spec)
    names = {ref.split("@")[0] for ref in stats.constitutions}
    if len(names) == 1 and (name := next(iter(names))) in shipped_constitutions():
        return load_constitution(name)
    found = ", ".join(sorted(stats.constitutions)) or "none"
    raise OptionError("constitution", f"is needed by `by` tag: the records' constitution ({found}) is not a "
                                      "single shipped one; give its NAME or PATH")


def breakdown(stats, by: str, constitution=None) -> dict:
    """The `by` section of a stats report: per principle or per tag, worst first, with the totals
    its rows add up to."""
    if by not in KEYS:
        raise OptionError("by", f"unknown value '{by}'; choose from {', '.join(KEYS)}")
    principles = stats.principles
    section: dict = {"key": by, "constitution": None}
    if by == "principle":
        rows = [row(name, [p]) for name, p in principles.items()]
    else:
        found = constitution_for(constitution, stats)
        section["constitution"] = found.ref
        tags_of = {p.id: list(p.tags) or [UNTAGGED] for p in found.principles}
        members: dict[str, list[str]] = {}
        for name in principles:
            for tag in tags_of.get(name, [UNTAGGED]):
                members.setdefault(tag, []).append(name)
        rows = [{**row(tag, [principles[n] for n in names]), "principles": sorted(names)}
                for tag, names in members.items()]
        section["overlapping"] = any(len(tags_of.get(name, [UNTAGGED])) > 1 for name in principles)
    section["groups"] = worst_first(rows)
    section["totals"] = {"kept": stats.kept, "dropped": stats.dropped}
    return section
