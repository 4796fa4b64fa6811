"""Curation between the pipeline and the output: filters, then the judge, then min-preference and
swap. Pairs that pass are returned to be written; the others go to the filtered side file with
their reasons. Keeps the counts a summary reports."""

from __future__ import annotations

import logging
from collections import Counter

from cai.output import SideFile
from cai.fingerprint import FINGERPRINT_KEYS
from cai.records import Record

log = logging.getLogger("cai")


class Curation:
    """`drops` receives, per dropped pair, its id, principle, the run's fingerprint and reasons
    (with `keep_whole`, the whole record and its reasons); a rerun skips the ids it holds."""

    def __init__(self, filters, judge, min_preference: float | None, swap: bool, drops: SideFile,
                 keep_whole: bool = False, trust_disagreeing: bool = False):
        self.filters, self.judge, self.min_preference, self.swap = filters, judge, min_preference, swap
        self.trust_disagreeing = trust_disagreeing
        self.disagreeing = 0         # judged pairs whose two orders disagree
        self.drops, self.keep_whole = drops, keep_whole
        self.reasons: Counter[str] = Counter()
        self.dropped = self.judged = self.unjudged = self.swapped = 0
        self.preferences: list[tuple[float, float]] = []      # (both orders, revision as (B))
        self._errors_seen: set[str] = set()
        self.first_error: str | None = None     # why the first unjudged pair could not be judged

    @property
    def active(self) -> bool:
        """Whether anything can drop a pair."""
        return self.filters is not None or self.min_preference is not None

    def __call__(self, records: list[Record]) -> list[Record]:
        from cai.edits import edit_of
        from cai.filters import curate

        kept = []
        for verdict in curate(records, self.filters, self.judge, self.min_preference, self.swap,
                              self.trust_disagreeing):
            judge = verdict.record.get("judge")
            if verdict.judge_error:
                self.unjudged += 1
                self.first_error = self.first_error or verdict.judge_error
                if verdict.judge_error not in self._errors_seen and len(self._errors_seen) < 5:
                    self._errors_seen.add(verdict.judge_error)      # each distinct reason once
                    log.warning("not judged: %s: %s", verdict.record.get("id"), verdict.judge_error)
            elif judge and self.judge is not None:
                self.judged += 1
                self.swapped += judge["swapped"]
                self.preferences.append((judge["preference"], judge["orders"][0]))
                self.disagreeing += judge.get("agree") is False
            if verdict.reasons:
                self.dropped += 1
                self.reasons.update(verdict.reasons)
                edit = edit_of(verdict.record)      # of the cleaned chosen, as a kept record's
                if self.keep_whole:
                    meta = verdict.record.get("meta")
                    verdict.record["meta"] = {**(meta if isinstance(meta, dict) else {}), "edit": edit}
                line = verdict.record if self.keep_whole else {
                    "id": verdict.record.get("id"), "principle": verdict.record.get("principle"),
                    # the run's fingerprint, so a rerun can tell whether this file is its own
                    "meta": {k: v for k, v in verdict.record.get("meta", {}).items() if k in FINGERPRINT_KEYS}}
                # a repaired pair that still failed: the reasons of every earlier try too
                earlier = verdict.record.get("meta", {}).get("repairs")
                self.drops.write({**line, "filter": {"reasons": verdict.reasons, "edit": edit,
                                                     **({"earlier": earlier} if earlier else {})}})
            else:
                kept.append(verdict.record)
        self.drops.sync()
        return kept

    def counts(self) -> dict:
        """The figures of a summary: dropped by reason, judged, and the judge's mean preferences."""
        n = len(self.preferences)
        return {"active": self.active, "judging": self.judge is not None, "swap": self.swap,
                "min_preference": self.min_preference,
                "dropped": self.dropped, "reasons": dict(self.reasons.most_common()),
                "judged": self.judged, "unjudged": self.unjudged, "judge_error": self.first_error,
                "swapped": self.swapped,
                "disagreeing": self.disagreeing,
                "preference": sum(p for p, _ in self.preferences) / n if n else None,
                "preference_revision_as_b": sum(o for _, o in self.preferences) / n if n else None}
