"""`cai compare`, as a library: two output files side by side, or two constitutions (or template
sets) run on the same prompts with the same seed and then compared.

Each side is read through `cai.stats.collect` (records, dropped records, failures and skipped
files); records are matched by id to find the pairs one side kept and the other dropped. Per
side and per principle: pairs kept, drop reasons, refusals, lengths, edit size, and the judge's
preference and order agreement where the records are judged. Prints nothing."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from cai.errors import OptionError

SHOWN = 3                # differing pairs shown in full, each way


def _summary(label: str, report: dict, stats) -> dict:
    """One side's overall figures."""
    from cai.breakdown import breakdown

    source, edits, judge = report["input"], report["edits"], report["judge"] or {}
    made = source["kept"] + source["dropped"]
    return {
        "label": label, "records": source["records"], "filtered": source["filtered"],
        "constitutions": sorted(stats.constitutions),
        "total": source["total"], "made": made, "kept": source["kept"], "dropped": source["dropped"],
        "failed": source["failed"], "skipped": source["skipped"],
        "kept_rate": round(source["kept"] / made, 4) if made else None,
        "dropped_by_reason": source["dropped_by_reason"],
        "refusals": sum(p["refusals"] for p in stats.principles.values()),
        "words_mean": {field: dist["mean"] for field, dist in report["lengths"].items()},
        "edit": {"distance_mean": edits["distance"]["mean"], "distance_p50": edits["distance"]["p50"],
                 "spans_mean": edits["spans"]["mean"], "distance_dropped_mean": edits["distance_dropped"]["mean"]},
        "judge": {"judged": judge.get("judged", 0), "mean_preference": judge.get("mean_preference"),
                  "preferred": judge.get("fraction_preferred"), "agreement": judge.get("agreement")},
        "principles": breakdown(stats, "principle")["groups"],
    }


def _read(label: str, records: str, filtered: str | None = None) -> tuple[dict, dict]:
    """(summary, verdicts by id) of one side: a verdict is (kept, principle, drop reasons)."""
    from cai.stats import collect

    verdicts: dict[str, tuple[bool, str | None, list[str]]] = {}

    def visit(kind: str, record: dict) -> None:
        if isinstance(record.get("id"), str):
            reasons = (record.get("filter") or {}).get("reasons") if isinstance(record.get("filter"), dict) else None
            verdicts[record["id"]] = (kind == "kept", record.get("principle"), list(reasons or []))

    report, stats = collect(records, filtered, visit=visit)
    return _summary(label, report, stats), verdicts


def _records_of(summary: dict, ids: set[str]) -> dict[str, dict]:
    """The records (kept or dropped lines) of one side with these ids, in a second pass."""
    from cai.inputs import iter_jsonl

    found: dict[str, dict] = {}
    for path in (summary["records"], summary["filtered"]):
        if path and ids:
            for _, _, record in iter_jsonl(path, warn=lambda message: None):
                if record.get("id") in ids:
                    found[record["id"]] = record
    return found


def _shown(record: dict | None, verdict) -> dict:
    from cai.messages import text_of

    def text(field):
        try:
            return text_of(record[field]) if record and field in record else None
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    meta = record.get("meta") if record and isinstance(record.get("meta"), dict) else {}
    judge = record.get("judge") if record and isinstance(record.get("judge"), dict) else {}
    edit = meta.get("edit") or ((record or {}).get("filter") or {}).get("edit")
    return {"kept": verdict[0], "principle": verdict[1], "reasons": verdict[2], "rejected": text("rejected"),
            "chosen": text("chosen"), "edit": edit, "preference": judge.get("preference"), "agree": judge.get("agree")}


def compare_files(a: str, b: str, labels: tuple[str, str] | None = None, *, show: int = SHOWN,
                  filtered: tuple[str | None, str | None] = (None, None)) -> dict:
    """The comparison of two output files (each with its side files)."""
    labels = labels or _file_labels(a, b)
    (left, left_v), (right, right_v) = _read(labels[0], a, filtered[0]), _read(labels[1], b, filtered[1])
    common = left_v.keys() & right_v.keys()
    only = {labels[0]: sorted(i for i in common if left_v[i][0] and not right_v[i][0]),
            labels[1]: sorted(i for i in common if right_v[i][0] and not left_v[i][0])}
    picked = {i for ids in only.values() for i in ids[:show]}
    records = (_records_of(left, picked), _records_of(right, picked))
    examples = []
    for label, ids in only.items():
        for i in ids[:show]:
            a_rec, b_rec = records[0].get(i), records[1].get(i)
            prompt = next((r.get("prompt") for r in (a_rec, b_rec) if r and "prompt" in r), None)
            examples.append({"id": i, "kept_by": label, "prompt": prompt if isinstance(prompt, str) else None,
                             labels[0]: _shown(a_rec, left_v[i]), labels[1]: _shown(b_rec, right_v[i])})
    return {
        "sides": [left, right],
        "differences": {
            "matched": len(common), "kept_both": sum(left_v[i][0] and right_v[i][0] for i in common),
            "dropped_both": sum(not left_v[i][0] and not right_v[i][0] for i in common),
            "kept_only_by": {label: len(ids) for label, ids in only.items()},
            "ids_kept_only_by": only,
            "unmatched": {labels[0]: len(left_v.keys() - common), labels[1]: len(right_v.keys() - common)},
            "examples": examples,
        },
        "runs": None,
    }


def _name(spec) -> str:
    """A short name for a constitution or template set: its name, or a path's file stem."""
    if hasattr(spec, "name") and not isinstance(spec, str):
        return str(spec.name)
    text = str(spec).rstrip("/")
    stem = Path(text).stem if ("/" in text or text.endswith((".yaml", ".yml"))) else text
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem) or "side"


def _file_labels(a: str, b: str) -> tuple[str, str]:
    names = (_name(Path(a).name.removesuffix(".jsonl")), _name(Path(b).name.removesuffix(".jsonl")))
    return names if names[0] != names[1] else ("a", "b")


def sides(constitutions: list, templates: list) -> list[tuple[str, object, str]]:
    """(label, constitution, templates) of the two runs: two constitutions, two template sets, or
    two of each; a side given once is the same on both."""
    if not 1 <= len(constitutions) <= 2 or not 1 <= len(templates) <= 2:
        raise OptionError("constitution", "give one or two constitutions and one or two template sets")
    if len(constitutions) == 1 and len(templates) == 1:
        raise OptionError("constitution", "compare runs needs two sides: two constitutions or two `templates`")
    cons = constitutions * (3 - len(constitutions))
    temps = templates * (3 - len(templates))
    if (_key(cons[0]), temps[0]) == (_key(cons[1]), temps[1]):
        raise OptionError("constitution", f"the two sides are the same ({_name(cons[0])}, templates {temps[0]})")
    by_c, by_t = _name(cons[0]) != _name(cons[1]), str(temps[0]) != str(temps[1])
    labels = [("+".join([_name(c)] * by_c + [_name(t)] * by_t) or _name(c)) for c, t in zip(cons, temps)]
    if labels[0] == labels[1]:
        labels = [f"a-{labels[0]}", f"b-{labels[1]}"]
    return [(label, c, t) for label, c, t in zip(labels, cons, temps)]


def _key(spec):
    return spec.ref if hasattr(spec, "ref") and not isinstance(spec, str) else str(spec)


def compare_runs(prompts, options, constitutions: list, templates: list, folder: str, *, show: int = SHOWN,
                 progress: Callable[[str, str, object], None] | None = None,
                 stop: Callable[[], bool] | None = None) -> dict:
    """Run `prompts` once per side (with `options`, a GenerateOptions, varying only the
    constitution or templates) into FOLDER/LABEL.jsonl, then compare the two files. A rerun
    resumes each side's run; dropped pairs are kept whole (keep_filtered) so they can be shown.
    `progress(label, phase, summary)` follows each run (`cai.run.generate.run`'s phases, then
    "done")."""
    from cai.run.generate import run

    pairs = sides(constitutions, templates)
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise OptionError("output", f"{folder} is a file; compare writes a folder of runs")
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for label, constitution, template_set in pairs:
        path = str(out / f"{label}.jsonl")
        side = replace(options, constitution=constitution, templates=template_set, keep_filtered=True,
                       filtered=None, failures=None, skipped=None)
        follow = (lambda phase, summary, label=label: progress(label, phase, summary)) if progress else None
        summary = None
        try:
            summary = run(prompts, path, side, progress=follow, stop=stop)
        finally:
            if progress:
                progress(label, "done", summary)     # None when the run failed
        runs.append({"label": label, "output": path, "constitution": summary.constitution,
                     "templates": str(template_set), "made": summary.made, "kept": summary.kept,
                     "dropped": summary.dropped, "failed": summary.failed, "resumed": summary.resumed,
                     "complete": summary.complete, "elapsed_s": round(summary.elapsed, 1)})
        if summary.stopped_by:
            break
    if len(runs) < 2:
        return {"sides": [], "differences": None, "runs": runs}
    report = compare_files(runs[0]["output"], runs[1]["output"], (pairs[0][0], pairs[1][0]), show=show)
    report["runs"] = runs
    return report


def plot(report: dict, target: str) -> None:
    """A PNG of the two sides: kept rate and drop reasons, edit distance, judge preference."""
    from cai.stats import check_plotting

    check_plotting()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    left, right = report["sides"]
    labels = [left["label"], right["label"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    reasons = list(dict.fromkeys([*left["dropped_by_reason"], *right["dropped_by_reason"]]))
    rows = ["kept", *reasons]
    width = 0.4
    for k, side in enumerate((left, right)):
        values = [side["kept"], *(side["dropped_by_reason"].get(r, 0) for r in reasons)]
        axes[0].barh([i + k * width for i in range(len(rows))], values, height=width, label=side["label"])
    axes[0].set_yticks([i + width / 2 for i in range(len(rows))], rows)
    axes[0].invert_yaxis()
    axes[0].legend()
    axes[0].set(title="pairs kept, and dropped by reason", xlabel="pairs")
    for ax, key, title in ((axes[1], "edit_distance_mean", "edit distance (mean, kept pairs)"),
                           (axes[2], "judge_mean", "judge P(revision better) (mean, kept)")):
        names = list(dict.fromkeys(p["name"] for side in (left, right) for p in side["principles"]))
        for k, side in enumerate((left, right)):
            by = {p["name"]: p[key] for p in side["principles"]}
            ax.barh([i + k * width for i in range(len(names))], [by.get(n) or 0 for n in names], height=width,
                    label=side["label"])
        ax.set_yticks([i + width / 2 for i in range(len(names))], names, fontsize=7)
        ax.invert_yaxis()
        ax.set(title=title, xlim=(0, 1))
    from cai.stats import save_figure

    save_figure(fig, target, f"cai compare: {labels[0]} vs {labels[1]}")
