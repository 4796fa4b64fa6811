"""`cai stats`: what a run produced, as a report dict (the CLI draws it; `plot` draws a PNG).

One pass over the records file and its side file of dropped records (PAIRS.filtered.jsonl);
per record the only real work is a word-level SequenceMatcher between rejected and chosen.
Samples are kept in compact arrays, so a million records cost tens of MB.
"""

from __future__ import annotations

import math
from array import array
from collections import Counter
from collections.abc import Callable
from difflib import SequenceMatcher
from pathlib import Path
from typing import IO

from cai.edits import edit_size
from cai.errors import InputError, OptionError
from cai.filters import is_refusal
from cai.filters import words as normalised_words
from cai.inputs import iter_jsonl
from cai.output import side_path
from cai.judging import orders_agree
from cai.messages import text_of as _text

NEAR_IDENTICAL = 0.9      # similarity ratio at or above which a pair counts as near-identical
HISTOGRAM_BINS = 10
PAIR_FIELDS = ("prompt", "chosen", "rejected")


def side_file(records: str) -> str | None:
    """The default side file of dropped records next to `records`; none for stdin."""
    return side_path(records, "filtered")


def percentile(ordered, q: float) -> float:
    """The q-th quantile (0-1) of sorted values, interpolated linearly between the closest
    ranks (numpy's default)."""
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def distribution(values) -> dict:
    """min, p10, p50, p90, max, mean of `values` (all None when there are none)."""
    keys = ("min", "p10", "p50", "p90", "max", "mean")
    if not len(values):
        return dict.fromkeys(keys)
    ordered = sorted(values)
    return {"min": _num(ordered[0]), "p10": _num(percentile(ordered, 0.1)), "p50": _num(percentile(ordered, 0.5)),
            "p90": _num(percentile(ordered, 0.9)), "max": _num(ordered[-1]), "mean": _num(sum(ordered) / len(ordered))}


def _num(value):
    """Whole numbers as ints, others rounded to 6 decimals (stable, readable JSON)."""
    if isinstance(value, float):
        value = round(value, 6)
        return int(value) if value.is_integer() else value
    return value


def _mean(total: float, count: int):
    return _num(total / count) if count else None


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def word_edits(a: list[str], b: list[str]) -> tuple[int, float]:
    """(word edits, similarity ratio) between two word lists: edits are the sum over the
    non-equal opcodes of the longer side of each."""
    if a == b:
        return 0, 1.0
    matcher = SequenceMatcher(None, a, b, autojunk=False)
    edits = sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in matcher.get_opcodes() if tag != "equal")
    return edits, matcher.ratio()


def _edit(value) -> dict | None:
    """A meta.edit / filter.edit value when it is well formed."""
    if isinstance(value, dict) and _number(value.get("distance")) is not None and _number(value.get("spans")) is not None:
        return value
    return None


class Stats:
    """Accumulates kept and dropped records; `report()` is the summary, the arrays are the
    samples (for plots)."""

    def __init__(self) -> None:
        self.kept = 0
        self.dropped = 0
        self.failed = 0
        self.skipped: Counter[str] = Counter()       # by kind: "too long", "refused", "invalid"
        self.side_files: dict[str, str] = {}
        self.torn = 0
        self.reasons: Counter[str] = Counter()
        self.principles: dict[str, dict] = {}
        self.lengths = {field: array("l") for field in ("prompt", "rejected", "chosen")}
        self.edits = array("l")
        self.similarity = array("d")
        self.near_identical = 0
        self.identical = 0
        self.preference = array("d")
        self.swapped = 0                # the judge preferred the original: chosen is the original
        self.orders = ([], [])          # orders[0] (revision shown as B), orders[1] (shown as A)
        self.response_finish: Counter[str] = Counter()
        self.revision_finish: Counter[str] = Counter()
        self.cleaned = 0
        self.repaired = 0               # kept after a repair (meta.repairs not empty)
        self.repair_made = False        # any record of a run with repairs (meta.attempts)
        self.dropped_after_repair = 0   # dropped though repaired (filter.earlier)
        self.edit_distance = array("d")  # meta.edit of kept records (computed where missing)
        self.edit_spans = array("l")
        self.edit_computed = 0          # kept records without meta.edit
        self.dropped_distance = array("d")   # of dropped records that carry one (filter.edit)
        self.agreeing = self.order_pairs = 0   # judged records whose two orders agree, of those with both
        self.constitutions: Counter[str] = Counter()   # meta.constitution of the records read
        self.decisions: dict[str, dict] | None = None   # the review's latest decision per id (cai review)
        self.review_file: str | None = None
        self.judge_compared = self.judge_agreeing = 0   # accept/swap decisions on judged pairs, and those the judge shares
        # issue 33: sampled pairs (meta.feedback): soft labels, order agreement, each principle's verdicts
        self.labels = array("d")
        self.feedback_agreement = array("d")
        self.feedback_principles: dict[str, list] = {}    # principle → [asked, chosen preference sum, won, agreeing]

    def _principle(self, record: dict) -> dict:
        name = record.get("principle")
        name = name if isinstance(name, str) and name else "?"
        if name not in self.principles:
            self.principles[name] = {"kept": 0, "dropped": 0, "judged": 0, "preference_sum": 0.0,
                                     "reasons": Counter(), "edit_sum": 0.0, "agreeing": 0, "order_pairs": 0,
                                     "refusals": 0, "chosen_words": 0, "rejected_words": 0}
        meta = record.get("meta")
        if isinstance(meta, dict) and isinstance(meta.get("constitution"), str):
            self.constitutions[meta["constitution"]] += 1
        return self.principles[name]

    def add_kept(self, record: dict, where: tuple[str, int]) -> None:
        texts = {}
        for field in PAIR_FIELDS:
            try:
                texts[field] = _text(record.get(field))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise InputError(where[0], "missing or not a string / message list",
                                 line=where[1], field=field) from None
        self.kept += 1
        principle = self._principle(record)
        principle["kept"] += 1
        words = {field: text.split() for field, text in texts.items()}
        for field, array_ in self.lengths.items():
            array_.append(len(words[field]))
        # Compared as the filters compare (lower-cased words without punctuation), so
        # "near-identical" here means what the "unchanged" filter means.
        rejected, chosen = normalised_words(texts["rejected"]), normalised_words(texts["chosen"])
        edits, ratio = word_edits(rejected, chosen)
        self.edits.append(edits)
        self.similarity.append(ratio)
        self.near_identical += ratio >= NEAR_IDENTICAL
        self.identical += rejected == chosen
        meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
        edit = _edit(meta.get("edit"))
        if edit is None:
            self.edit_computed += 1
            edit = edit_size(texts["rejected"], texts["chosen"])
        self.edit_distance.append(edit["distance"])
        self.edit_spans.append(int(edit["spans"]))
        principle["edit_sum"] += edit["distance"]
        principle["refusals"] += is_refusal(texts["chosen"])
        principle["chosen_words"] += len(words["chosen"])
        principle["rejected_words"] += len(words["rejected"])

        judge = record.get("judge")
        preference = _number(judge.get("preference")) if isinstance(judge, dict) else None
        if preference is not None and self.decisions:
            self._compare(record, judge, preference)
        if preference is not None:
            self.preference.append(preference)
            principle["judged"] += 1
            principle["preference_sum"] += preference
            self.swapped += judge.get("swapped") is True
            orders = judge.get("orders")
            if isinstance(orders, list) and len(orders) == 2:
                values = [_number(value) for value in orders]
                for i, value in enumerate(values):
                    if value is not None:
                        self.orders[i].append(value)
                if None not in values:
                    agree = judge.get("agree")
                    agree = orders_agree(values) if not isinstance(agree, bool) else agree
                    self.order_pairs += 1
                    self.agreeing += agree
                    principle["order_pairs"] += 1
                    principle["agreeing"] += agree

        if isinstance(meta.get("feedback"), dict):
            self._feedback(meta["feedback"])
        finish = meta.get("finish_reasons") if isinstance(meta.get("finish_reasons"), dict) else {}
        if isinstance(finish.get("response"), str):
            self.response_finish[finish["response"]] += 1
        revision = finish.get("revision")
        if isinstance(revision, list) and revision and isinstance(revision[-1], str):
            self.revision_finish[revision[-1]] += 1
        elif isinstance(revision, str):
            self.revision_finish[revision] += 1
        self.cleaned += bool(meta.get("cleaned"))
        self.repaired += bool(meta.get("repairs"))
        self.repair_made = self.repair_made or "attempts" in meta

    def _feedback(self, feedback: dict) -> None:
        """A sampled pair's comparison: its label, and per principle asked the probability that
        the chosen answer is the better (both orders' mean) and whether the two orders agree."""
        label = _number(feedback.get("label"))
        if label is not None:
            self.labels.append(label)
        agreement = _number(feedback.get("agreement"))
        if agreement is not None:
            self.feedback_agreement.append(agreement)
        principles, orders = feedback.get("principles"), feedback.get("orders")
        if not isinstance(principles, list) or not isinstance(orders, list) or len(principles) != len(orders):
            return
        for name, pair in zip(principles, orders):
            values = [_number(v) for v in pair] if isinstance(pair, list) and len(pair) == 2 else [None]
            if None in values:
                continue
            entry = self.feedback_principles.setdefault(str(name), [0, 0.0, 0, 0])
            mean = sum(values) / 2
            entry[0] += 1
            entry[1] += mean
            entry[2] += mean > 0.5
            entry[3] += orders_agree(values)

    def feedback_report(self) -> dict | None:
        if not self.labels:
            return None
        n = len(self.labels)
        counts = [0] * HISTOGRAM_BINS
        for p in self.labels:
            counts[min(max(int(p * HISTOGRAM_BINS), 0), HISTOGRAM_BINS - 1)] += 1
        return {
            "pairs": n,
            "label": distribution(self.labels),
            "histogram": {"edges": [_num(i / HISTOGRAM_BINS) for i in range(HISTOGRAM_BINS + 1)], "counts": counts},
            "agreement": _mean(sum(self.feedback_agreement), len(self.feedback_agreement)),
            "principles": {name: {"asked": asked, "chosen_mean": _mean(total, asked), "win_rate": _mean(won, asked),
                                  "agreement": _mean(agreeing, asked)}
                           for name, (asked, total, won, agreeing) in sorted(
                               self.feedback_principles.items(), key=lambda kv: (-kv[1][0], kv[0]))},
        }

    def _compare(self, record: dict, judge: dict, preference: float) -> None:
        """A reviewer's accept (the chosen side is better) or swap (the rejected one is) against
        the judge's verdict on the chosen side (its preference, or 1 - it where it swapped)."""
        entry = self.decisions.get(str(record.get("id")))
        if entry is None or entry.get("decision") not in ("accept", "swap"):
            return
        chosen = 1 - preference if judge.get("swapped") is True else preference
        self.judge_compared += 1
        self.judge_agreeing += (chosen > 0.5) if entry["decision"] == "accept" else (chosen < 0.5)

    def review_report(self) -> dict | None:
        if self.decisions is None:
            return None
        counts = Counter(entry["decision"] for entry in self.decisions.values())
        reviewers = Counter(str(entry.get("reviewer") or "?") for entry in self.decisions.values())
        return {"file": self.review_file, "reviewed": len(self.decisions), "of": self.kept + self.dropped,
                "decisions": {d: counts[d] for d in ("accept", "reject", "swap", "tie", "skip", "edit")},
                "reviewers": dict(reviewers.most_common()),
                "judge_compared": self.judge_compared,
                "judge_agreement": _mean(self.judge_agreeing, self.judge_compared)}

    def add_dropped(self, record: dict) -> None:
        self.dropped += 1
        principle = self._principle(record)
        principle["dropped"] += 1
        filt = record.get("filter")
        reasons = filt.get("reasons") if isinstance(filt, dict) else None
        if isinstance(reasons, str):
            reasons = [reasons]
        if not isinstance(reasons, list) or not reasons:
            reasons = ["?"]
        for reason in dict.fromkeys(str(r) for r in reasons):   # once per reason, in order
            self.reasons[reason] += 1
            principle["reasons"][reason] += 1
        meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
        edit = _edit(filt.get("edit") if isinstance(filt, dict) else None) or _edit(meta.get("edit"))
        if edit is None and "chosen" in record and "rejected" in record:
            try:
                edit = edit_size(_text(record["rejected"]), _text(record["chosen"]))
            except (ValueError, KeyError, TypeError, AttributeError):
                edit = None
        if edit is not None:
            self.dropped_distance.append(edit["distance"])
        self.dropped_after_repair += isinstance(filt, dict) and bool(filt.get("earlier"))

    def add_unmade(self, line: dict, kind: str) -> None:
        """A line of the failures file (kind 'failed') or of the skipped file ('skipped')."""
        if kind == "failed":
            self.failed += 1
        else:
            self.skipped[str(line.get("kind") or "?")] += 1

    def report(self, records: str, filtered: str | None, filtered_found: bool) -> dict:
        judge = None
        if self.preference:
            n = len(self.preference)
            counts = [0] * HISTOGRAM_BINS
            for p in self.preference:
                counts[min(max(int(p * HISTOGRAM_BINS), 0), HISTOGRAM_BINS - 1)] += 1
            judge = {
                "judged": n,
                "mean_preference": _mean(sum(self.preference), n),
                "mean_revision_as_b": _mean(sum(self.orders[0]), len(self.orders[0])),
                "mean_revision_as_a": _mean(sum(self.orders[1]), len(self.orders[1])),
                "fraction_preferred": _mean(sum(p > 0.5 for p in self.preference), n),
                "swapped": self.swapped,
                "agreement": _mean(self.agreeing, self.order_pairs),
                "disagreeing": self.order_pairs - self.agreeing,
                "histogram": {"edges": [_num(i / HISTOGRAM_BINS) for i in range(HISTOGRAM_BINS + 1)],
                              "counts": counts},
            }
        return {
            "input": {
                "records": records, "filtered": filtered if filtered_found else None,
                "kept": self.kept, "dropped": self.dropped, "failed": self.failed,
                "skipped": sum(self.skipped.values()), "skipped_by_kind": dict(self.skipped.most_common()),
                "total": self.kept + self.dropped + self.failed + sum(self.skipped.values()),
                "side_files": self.side_files,
                "dropped_by_reason": dict(self.reasons.most_common()), "torn_lines": self.torn,
            },
            "repairs": {"kept_first_try": self.kept - self.repaired, "kept_after_repair": self.repaired,
                        "dropped_after_repair": self.dropped_after_repair}
            if self.repair_made or self.dropped_after_repair else None,
            "principles": {
                name: {"kept": p["kept"], "dropped": p["dropped"],
                       "judge_mean": _mean(p["preference_sum"], p["judged"])}
                for name, p in sorted(self.principles.items(), key=lambda kv: (-kv[1]["kept"], kv[0]))
            },
            "lengths": {field: distribution(values) for field, values in self.lengths.items()},
            "edits": {
                "word_edits": distribution(self.edits),
                "similarity": distribution(self.similarity),
                "near_identical": self.near_identical,
                "identical": self.identical,
                "distance": distribution(self.edit_distance),
                "spans": distribution(self.edit_spans),
                "distance_dropped": distribution(self.dropped_distance),
                "computed": self.edit_computed,
            },
            "judge": judge,
            "feedback": self.feedback_report(),
            "finish_reasons": {"response": dict(self.response_finish.most_common()),
                               "revision": dict(self.revision_finish.most_common())},
            "cleaned": self.cleaned,
            "review": self.review_report(),
        }


def collect(records: str, filtered: str | None = None, *, stdin: IO[bytes] | None = None,
            warn: Callable[[str], None] | None = None,
            visit: Callable[[str, dict], None] | None = None) -> tuple[dict, Stats]:
    """(report, samples) of a records file and its side file of dropped records.

    `filtered` None means the default side file (PAIRS.filtered.jsonl; none for stdin), whose
    absence means nothing was dropped; a side file named explicitly must exist. `visit(kind,
    record)` sees each kept ("kept") and dropped ("dropped") record once counted."""
    stats = Stats()

    def torn(message: str) -> None:
        stats.torn += 1
        if warn:
            warn(message)

    if records != "-":                  # the reviewer's decisions (cai review), read first: they are few
        from cai.review.decisions import load, review_path

        if Path(review_path(records)).is_file():
            stats.review_file = review_path(records)
            stats.decisions = load(stats.review_file, warn=warn)

    for name, number, record in iter_jsonl(records, stdin=stdin, warn=torn):
        stats.add_kept(record, (name, number))
        if visit:
            visit("kept", record)
    explicit = filtered is not None
    filtered = filtered if explicit else side_file(records)
    found = filtered is not None and Path(filtered).is_file()
    if explicit and not found and not Path(filtered).is_dir():
        raise InputError(filtered, "no such file (`filtered`)")
    if explicit or found:
        for _, _, record in iter_jsonl(filtered, warn=torn):
            stats.add_dropped(record)
            if visit:
                visit("dropped", record)
    if records != "-":           # what the run could not make: its failures and skipped files
        for kind, side in (("failed", "failures"), ("skipped", "skipped")):
            path = side_path(records, side)
            if Path(path).is_file():
                stats.side_files[kind] = path
                for _, _, line in iter_jsonl(path, warn=torn):
                    stats.add_unmade(line, kind)
    report = stats.report(records, filtered, found)
    report["runs"] = runs_report(records) if records != "-" else None
    return report, stats


def runs_report(records: str) -> dict | None:
    """What the manifest beside `records` (OUT.runs.jsonl) says: for a merged file, the array's
    shards (present, missing, unfinished); for a run's output, its shard, whether its last run
    finished, and each endpoint's figures. None without a manifest."""
    from cai.output import read_runs

    lines = read_runs(records)
    if not lines:
        return None
    last = lines[-1]
    if last.get("event") == "merge":
        return {"merged_from": len(last.get("inputs") or ()), "shards": last.get("shards")}
    starts = [line for line in lines if line.get("event") == "start"]
    ends = [line for line in lines if line.get("event") == "end"]
    return {"runs": len(starts), "shard": (starts[-1] if starts else {}).get("shard"),
            "finished": last.get("event") == "end" and last.get("finished") is True,
            "endpoints": (ends[-1].get("endpoints") if ends else None) or []}


def check_plotting() -> None:
    """Fail now, before reading anything, when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise OptionError("plot", "needs matplotlib (pip install 'cai[plot]')") from None


def plot(report: dict, stats: Stats, target: str) -> None:
    """A PNG of the lengths, similarity, judge preference (when judged) and drop reasons."""
    check_plotting()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["lengths", "similarity"] + (["judge"] if report["judge"] else []) + ["dropped"]
    rows = math.ceil(len(panels) / 2)
    fig, axes = plt.subplots(rows, 2, figsize=(11, 4 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax, panel in zip(flat, panels):
        if panel == "lengths":
            data = [list(stats.lengths["rejected"]), list(stats.lengths["chosen"])]
            if any(data):
                ax.hist(data, bins=30, label=["rejected", "chosen"], alpha=0.8)
                ax.legend()
            ax.set(title="length (words)", xlabel="words", ylabel="records")
        elif panel == "similarity":
            ax.hist(list(stats.similarity), bins=20, range=(0, 1), color="tab:green")
            ax.axvline(NEAR_IDENTICAL, color="gray", linestyle="--", linewidth=1)
            ax.set(title="similarity of rejected and chosen (word-level ratio)", xlabel="ratio", ylabel="records")
        elif panel == "judge":
            hist = report["judge"]["histogram"]
            edges = hist["edges"]
            ax.bar(edges[:-1], hist["counts"], width=edges[1] - edges[0], align="edge",
                   color="tab:purple", edgecolor="white")
            ax.axvline(0.5, color="gray", linestyle="--", linewidth=1)
            ax.set(title="judge: P(revision better)", xlabel="preference", ylabel="records", xlim=(0, 1))
        else:
            reasons = report["input"]["dropped_by_reason"]
            if reasons:
                ax.barh(list(reasons)[::-1], list(reasons.values())[::-1], color="tab:red")
            else:
                ax.text(0.5, 0.5, "nothing dropped", ha="center", va="center", transform=ax.transAxes)
                ax.set(xticks=[], yticks=[])
            ax.set(title=f"dropped: {report['input']['dropped']} of {report['input']['total']}", xlabel="records")
    for ax in flat[len(panels):]:
        ax.axis("off")
    save_figure(fig, target, f"cai stats: {report['input']['records']} ({report['input']['kept']} kept)")


def save_figure(fig, target: str, title: str) -> None:
    """Title, lay out and write a matplotlib figure (a one-line InputError if it cannot be
    written), and free it."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    try:
        fig.savefig(target, dpi=100)
    except OSError as exc:
        raise InputError(target, f"cannot write plot: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
