"""Repair: a pair the filters would drop gets another try at its failing turn (--repairs N)
before it is dropped. Scripted backends make the failures; the tiny model runs it end to end."""

from __future__ import annotations

import json

import pytest

import cai
from cai.backends.base import Completion
from conftest import read_jsonl
from cai.backends.scripted import ScriptedBackend, ScriptedStream

PROMPTS = ["Boil an egg", "Make tea", "Cut bread", "Fold a shirt"]


class FlakyBackend(ScriptedBackend):
    """`flaky` prompts repeat their response as the first revision (unchanged) and do better on a
    retry; `stubborn` ones always do; `long` ones run past the token limit on their first response."""

    def __init__(self, flaky=(), stubborn=(), long=(), **kw):
        super().__init__(unchanged=set(stubborn), **kw)
        self.flaky, self.long = set(flaky), set(long)
        self.requests = []

    def stream(self, params, width, longest=None):
        return _Recording(self, width)


class _Recording(ScriptedStream):
    """Turns told apart by their request (a retried turn is the same turn again), every request kept."""

    def poll(self):
        batch, self.waiting = self.waiting[:self.width], self.waiting[self.width:]
        out = []
        for request, _ in batch:
            self.backend.requests.append(request)
            text = request.conversation[-1]["content"]
            turn = 1 if "critique of your previous response" in text else 2 if "improved answer" in text else 0
            prompt = next((p for p in PROMPTS if any(p in m["content"] for m in request.conversation)), "")
            tries = sum(r.key == request.key and r.conversation[-1]["content"] == text for r in self.backend.requests)
            if turn == 0 and prompt in self.backend.long and tries == 1:
                completion = Completion("An answer that goes on and on", "length", 1, 256)
            elif turn == 2 and prompt in self.backend.flaky and tries == 1:
                completion = Completion(request.conversation[-4]["content"], "stop", 1, 9)    # the response again
            else:
                completion = self.backend.reply(request.conversation, turn)
            out.append((request.key, completion))
        return out


def _gen(backend, repairs, **options):
    return cai.generate(PROMPTS, model=backend, output=None, repairs=repairs, keep_filtered=True, **options)


def _same(records):
    """Records as text without their creation time."""
    return sorted(json.dumps({**r, "meta": {k: v for k, v in r["meta"].items() if k != "created"}}, sort_keys=True)
                  for r in records)


def test_repairs_off_makes_todays_records():
    """Before repairs, a run made its pairs and then filtered them: `--repairs 0` must write just
    those records (the raw pairs of a run without filters, put through the same filters)."""
    from cai.filters import DEFAULT_CHECKS, FilterConfig, Filters, references_of

    raw = cai.generate(PROMPTS, model=FlakyBackend(flaky={"Make tea"}), output=None, filter=False).records
    filters = Filters(FilterConfig(checks=DEFAULT_CHECKS, references=references_of(cai.load_constitution("harmless"))))
    before = [v.record for v in map(filters.apply, raw) if v.kept]
    for record in before:           # the unfiltered run says so in its provenance; the filtered one does not
        assert record["meta"]["params"].pop("filters") == "off"
    off = _gen(FlakyBackend(flaky={"Make tea"}), 0)

    def content(records):
        return _same([{**r, "meta": {k: v for k, v in r["meta"].items() if k not in ("edit", "config")}} for r in records])

    assert content(off.records) == content(before) and len(before) == 3
    assert all("attempts" not in r["meta"] and "repairs" not in r["meta"]["params"] for r in off.records)
    assert off.dropped == 1 and off.side["filtered"][0]["filter"]["reasons"] == ["unchanged"]


def test_a_failing_revision_is_tried_again_and_kept():
    backend = FlakyBackend(flaky={"Make tea"}, stubborn={"Cut bread"})
    summary = _gen(backend, 2)
    kept = {r["prompt"]: r for r in summary.records}
    assert set(kept) == {"Boil an egg", "Make tea", "Fold a shirt"} and summary.repaired == 1
    tea = kept["Make tea"]["meta"]
    assert tea["repairs"] == [{"turn": "revision 1", "reasons": ["unchanged"], "tokens": 9}]
    assert tea["attempts"] == {"response": 1, "critique 1": 1, "revision 1": 2}
    assert kept["Boil an egg"]["meta"]["repairs"] == [] and kept["Boil an egg"]["meta"]["params"]["repairs"] == 2
    dropped, = summary.side["filtered"]
    assert dropped["prompt"] == "Cut bread" and dropped["filter"]["reasons"] == ["unchanged"]
    assert dropped["filter"]["earlier"] == [{"turn": "revision 1", "reasons": ["unchanged"], "tokens": 14}] * 2
    # each retry has its own seed, and only the revision was asked again
    tea_requests = [r for r in backend.requests if "Make tea" in r.conversation[-1]["content"]
                    or any("Make tea" in m["content"] for m in r.conversation)]
    revisions = [r for r in tea_requests if "improved answer" in r.conversation[-1]["content"]]
    assert len(revisions) == 2 and revisions[0].seed != revisions[1].seed
    assert revisions[0].conversation == revisions[1].conversation      # the same turn, the cache reused
    assert summary.kept + summary.dropped == summary.planned


def test_a_repair_from_the_critique_samples_both_again():
    backend = FlakyBackend(flaky={"Make tea"})
    summary = _gen(backend, 1, repair_from="critique")
    tea = next(r for r in summary.records if r["prompt"] == "Make tea")["meta"]
    assert tea["attempts"] == {"response": 1, "critique 1": 2, "revision 1": 2}
    assert tea["params"]["repair_from"] == "critique"
    critiques = [r for r in backend.requests if "critique of your previous response" in r.conversation[-1]["content"]
                 and any("Make tea" in m["content"] for m in r.conversation)]
    assert len(critiques) == 2 and critiques[0].conversation == critiques[1].conversation
    assert critiques[0].seed != critiques[1].seed


def test_a_truncated_response_is_resampled_before_the_critique():
    backend = FlakyBackend(long={"Fold a shirt"})
    summary = _gen(backend, 1)
    record = next(r for r in summary.records if r["prompt"] == "Fold a shirt")
    assert record["meta"]["repairs"] == [{"turn": "response", "reasons": ["truncated"], "tokens": 256}]
    assert record["meta"]["finish_reasons"]["response"] == "stop"
    critiques = [r for r in backend.requests if "critique of your previous response" in r.conversation[-1]["content"]
                 and any("Fold a shirt" in m["content"] for m in r.conversation)]
    assert len(critiques) == 1 and "goes on and on" not in json.dumps(critiques[0].conversation)
    off = _gen(FlakyBackend(long={"Fold a shirt"}), 0)
    assert off.side["filtered"][0]["filter"]["reasons"] == ["truncated"]


def test_greedy_repairs_sample_and_say_so():
    backend = FlakyBackend(flaky={"Make tea"})
    summary = _gen(backend, 1, temperature=0)
    tea = next(r for r in summary.records if r["prompt"] == "Make tea")
    assert tea["meta"]["repair_temperature"] == 0.5
    retried = [r for r in backend.requests if r.params is not None]
    assert len(retried) == 1 and retried[0].params.temperature == 0.5
    assert all("repair_temperature" not in r["meta"] for r in summary.records if r["prompt"] != "Make tea")


def test_repairs_need_the_filters_and_a_number():
    summary = _gen(FlakyBackend(flaky={"Make tea"}), 2, filter=False)
    assert summary.kept == 4 and "repairs" not in summary.records[0]["meta"]["params"]
    with pytest.raises(cai.OptionError, match="repairs: must be at least 0"):
        _gen(FlakyBackend(), -1)


def test_repaired_records_are_the_same_however_the_run_is_cut(tiny_model, tmp_path):
    """The tiny model's random text is what the filters drop, so most pairs get repaired; the
    records must not depend on how many run at once, or on a resume."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"Question number {i}: how do I do thing {i}?" for i in range(6)) + "\n")
    common = dict(model=str(tiny_model), max_new_tokens=8, repairs=2, temperature=0, few_shot=False,
                  keep_filtered=True)
    whole = cai.generate(str(prompts), str(tmp_path / "a.jsonl"), batch_size=4, **common)
    cut = tmp_path / "b.jsonl"
    cai.generate(str(prompts), str(cut), batch_size=1, limit=2, **common)
    cai.generate(str(prompts), str(cut), batch_size=3, **common)
    assert whole.made == 6
    a = read_jsonl(tmp_path / "a.jsonl") + read_jsonl(tmp_path / "a.jsonl.filtered.jsonl")
    b = read_jsonl(cut) + read_jsonl(tmp_path / "b.jsonl.filtered.jsonl")
    assert len(a) == 6 and _same(a) == _same(b)
    assert any(r["meta"]["repairs"] for r in a)


def test_stats_and_the_summary_count_repairs(tmp_path):
    from cai.stats import collect

    out = tmp_path / "pairs.jsonl"
    summary = cai.generate(PROMPTS, str(out), model=FlakyBackend(flaky={"Make tea"}, stubborn={"Cut bread"}), repairs=1)
    assert (summary.kept, summary.repaired, summary.dropped) == (3, 1, 1)
    assert summary.as_dict()["kept_per_min"] > 0
    report, _ = collect(str(out))
    assert report["repairs"] == {"kept_first_try": 2, "kept_after_repair": 1, "dropped_after_repair": 1}
    plain = tmp_path / "plain.jsonl"
    cai.generate(PROMPTS, str(plain), model=FlakyBackend(), repairs=0)
    assert collect(str(plain))[0]["repairs"] is None
