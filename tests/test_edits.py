"""Edit size (meta.edit) on hand-made pairs and through a run, and the judge's order agreement
with the tie rule of --min-preference (ScriptedBackend: no model)."""

from __future__ import annotations

import random

import pytest
from cai.backends.scripted import ScriptedBackend

import cai
from cai.backends.base import ChoiceScores
from cai.edits import edit_of, edit_size
from cai.filters import curate
from cai.judging import decisive_preference, orders_agree


@pytest.mark.parametrize("rejected, chosen, distance, spans", [
    ("a b c", "a b c", 0.0, 0),
    ("a b c", "a  b\nc", 0.0, 0),                     # whitespace is not a word
    ("a b c", "a x c", 0.3333, 1),                    # one word of three replaced
    ("a b c d e", "a x c d y", 0.4, 2),               # two separate replacements
    ("a b c d", "a b c d e f", 0.3333, 1),            # two words appended: one span
    ("a b c d", "a d", 0.5, 1),                       # two words deleted
    ("one two", "three four five", 1.0, 1),           # nothing kept
    ("", "a b", 1.0, 1),
    ("Stay safe.", "Stay safe!", 0.5, 1),             # punctuation counts
    ("x " * 3 + "keep this", "y " * 3 + "keep this", 0.6, 1),
])
def test_edit_size_by_hand(rejected, chosen, distance, spans):
    assert edit_size(rejected, chosen) == {"distance": distance, "spans": spans}


def test_edit_size_stays_within_bounds_on_long_texts():
    rng = random.Random(0)
    vocabulary = ["the", "a", "of", "and", "to", "is.", *map(str, range(300))]
    words = [rng.choice(vocabulary) for _ in range(20_000)]
    edited = list(words)
    for i in range(0, len(edited), 100):
        edited[i] = "CHANGED"
    size = edit_size(" ".join(words), " ".join(edited))
    assert size["spans"] == 200 and size["distance"] == pytest.approx(0.01, abs=0.002)
    other = " ".join(rng.choice(vocabulary) for _ in range(5_000))
    assert 0.0 <= edit_size(" ".join(words[:5_000]), other)["distance"] <= 1.0


def test_edit_of_reads_either_record_shape():
    conversational = {"chosen": [{"role": "assistant", "content": "a x c"}],
                      "rejected": [{"role": "assistant", "content": "a b c"}]}
    assert edit_of(conversational) == {"distance": 0.3333, "spans": 1}
    assert edit_of({"chosen": 3}) is None


def test_a_run_writes_meta_edit_on_kept_and_dropped_pairs(tmp_path):
    out = tmp_path / "pairs.jsonl"
    summary = cai.generate([f"q{i} boil water" for i in range(6)], str(out), model=ScriptedBackend(unchanged={"q2"}),
                           max_new_tokens=16, repairs=0)
    assert summary.kept == 5 and summary.dropped == 1
    from conftest import read_jsonl

    for record in read_jsonl(out):
        assert record["meta"]["edit"] == edit_size(record["rejected"], record["chosen"])     # of the cleaned chosen
    (dropped,) = read_jsonl(f"{out}.filtered.jsonl")
    assert dropped["filter"] == {"reasons": ["unchanged"], "edit": {"distance": 0.0, "spans": 0}}
    whole = cai.generate(["q2 boil water"], None, model=ScriptedBackend(unchanged={"q2"}), keep_filtered=True,
                         repairs=0)
    (line,) = whole.side["filtered"]
    assert line["meta"]["edit"] == line["filter"]["edit"] == {"distance": 0.0, "spans": 0}


class AgreeingBackend(ScriptedBackend):
    """A judge whose two orders agree: the revision wins as (B) and as (A)."""

    def score_choices(self, conversations, choices, prefix=""):
        return [ChoiceScores({"A": -1.0, "B": -0.5} if i % 2 == 0 else {"A": -0.5, "B": -1.0})
                for i in range(len(conversations))]


def test_orders_agree():
    assert orders_agree([0.7, 0.6]) and orders_agree([0.3, 0.2]) and orders_agree([0.5, 0.9])
    assert not orders_agree([0.62, 0.38]) and not orders_agree([0.4, 0.8])
    assert decisive_preference({"preference": 0.7, "orders": [0.95, 0.45]}) == 0.5        # no `agree`: from orders
    assert decisive_preference({"preference": 0.7, "agree": False}, trust_disagreeing=True) == 0.7


def test_judge_agree_and_the_tie_rule_of_min_preference():
    prompts = [f"q{i} boil water" for i in range(3)]
    # ScriptedBackend's judge prefers option (B) whichever it is: the orders disagree (0.62 vs 0.38)
    split = cai.generate(prompts, None, model=ScriptedBackend(), judge=True, keep_filtered=True, min_preference=0.45)
    assert split.kept == 3, "a tie (0.5) passes a minimum below it"
    assert all(r["judge"]["agree"] is False for r in split.records)
    assert split.curation["disagreeing"] == 3
    split = cai.generate(prompts, None, model=ScriptedBackend(), judge=True, keep_filtered=True, min_preference=0.55)
    assert split.kept == 0 and all(line["filter"]["reasons"] == ["judge"] for line in split.side["filtered"])
    agreeing = cai.generate(prompts, None, model=AgreeingBackend(), judge=True, min_preference=0.55)
    assert agreeing.kept == 3 and all(r["judge"]["agree"] is True for r in agreeing.records)
    assert all(r["judge"]["preference"] == pytest.approx(0.622459) for r in agreeing.records)


def test_trust_disagreeing_reads_the_averaged_preference():
    class Lopsided:
        """Orders 0.9 and 0.4: averaged 0.65, but they disagree."""

        def label(self, records):
            for r in records:
                r["judge"] = {"preference": 0.65, "orders": [0.9, 0.4], "agree": False, "label": 0.65, "swapped": False}
            return [None] * len(records)

    def record():
        return {"id": "x", "prompt": "p", "chosen": "c", "rejected": "r", "meta": {}}

    assert curate([record()], None, Lopsided(), min_preference=0.6)[0].reasons == ["judge"]
    assert curate([record()], None, Lopsided(), min_preference=0.6, trust_disagreeing=True)[0].reasons == []
    kept = curate([record()], None, Lopsided(), min_preference=0.6, trust_disagreeing=True)[0].record
    assert kept["judge"]["preference"] == 0.65, "soft labels stay as they were"


def test_trust_disagreeing_needs_min_preference():
    with pytest.raises(cai.OptionError, match="trust_disagreeing"):
        cai.generate(["q"], None, model=ScriptedBackend(), judge=True, trust_disagreeing=True)
    with pytest.raises(cai.OptionError, match="judge"):
        cai.generate(["q"], None, model=ScriptedBackend(), min_preference=0.5, trust_disagreeing=True)
