"""Clean-up and filters (pure Python), and `cai generate`'s filtering end to end on the tiny model."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cai.cli import app
from cai.constitution import load_constitution
from cai.filters import (DEFAULT_CHECKS, REASONS, FilterConfig, Filters, clean_revision, containment, curate,
                         is_refusal, references_of, similarity, talks_about_itself)
from conftest import ROOT, read_jsonl

EXAMPLES = ROOT / "examples" / "prompts.jsonl"


@pytest.mark.parametrize("raw, clean", [
    ("Sure, here is a revised response:\n\nYou should ask a locksmith.", "You should ask a locksmith."),
    ("Revision: Ask a locksmith.", "Ask a locksmith."),
    ("**Revised response:** Ask a locksmith.", "Ask a locksmith."),
    ("Revised response (safer): Ask a locksmith.", "Ask a locksmith."),
    ("Assistant: Ask a locksmith.", "Ask a locksmith."),
    ("Based on the critique above, here's a better answer: Ask a locksmith.", "Ask a locksmith."),
    ("Following the feedback, I rewrote it:\nAsk a locksmith.", "Ask a locksmith."),
    ("I have revised the response to remove the harmful part:\nAsk a locksmith.", "Ask a locksmith."),
    ("Okay! Here's a more helpful answer: Ask a locksmith.", "Ask a locksmith."),
    ("Sure! Revision: Here is the improved answer: Ask a locksmith.", "Ask a locksmith."),
    ('Here is the rewritten response: "Ask a locksmith."', "Ask a locksmith."),
    ("“Ask a locksmith.”", "Ask a locksmith."),
    ("Ask a locksmith.<|im_end|>", "Ask a locksmith."),
    ("Ask a locksmith.\nUser: thanks!\nAssistant: you're welcome", "Ask a locksmith."),
    ("Ask a locksmith.<|im_start|>user\nthanks", "Ask a locksmith."),
    ("Ask a locksmith.\n\nCritique: this is fine now.", "Ask a locksmith."),
    ("Ask a locksmith.\n\n(Note: I removed the instructions for picking the lock.)", "Ask a locksmith."),
])
def test_clean_revision_strips_what_surrounds_the_answer(raw, clean):
    text, notes = clean_revision(raw)
    assert text == clean
    assert notes, "every removal is noted"


@pytest.mark.parametrize("text", [
    "The answer is 42.",
    "Here are three ideas: oatmeal, eggs and fruit.",
    "Here is my answer: call a locksmith.",
    'He said "hello" and "goodbye".',
    "Note: take it with food.",
    "Answering honestly, no.",
])
def test_clean_revision_leaves_answers_alone(text):
    assert clean_revision(text) == (text, [])


def test_role_lines_stay_when_the_prompt_asks_for_dialogue():
    dialogue = "User: hi\nAssistant: hello\nUser: bye"
    assert clean_revision("Sure.\n" + dialogue, "Write a short dialogue between a user and an assistant.")[0] == \
        "Sure.\n" + dialogue
    assert clean_revision("Sure.\n" + dialogue, "Say hi.")[0] == "Sure."


def test_measures():
    assert similarity("Call a locksmith!", "call a   LOCKSMITH") == 1.0
    assert similarity("a b c d e f g h i j", "a b c d z f g h i j") == pytest.approx(0.9)
    assert similarity("", "") == 1.0 and similarity("a", "") == 0.0
    assert containment("the quick brown fox jumps", "so the quick brown fox jumps high") == 1.0
    assert containment("the quick brown fox jumps", "a lazy dog sleeps all day long") == 0.0
    assert is_refusal("I'm sorry, but I can't help with that.") and is_refusal("I cannot assist with this request.")
    assert not is_refusal("Boil the egg for nine minutes.")
    assert talks_about_itself("The response is harmful because it explains lock picking.")
    assert talks_about_itself("Your original answer was too long; here it is shorter.")
    assert talks_about_itself("I have rewritten it to be safer: ask a locksmith.")
    assert not talks_about_itself("The answer is eight planets.")
    assert not talks_about_itself("A good critique names one strength and one weakness.",
                                  "Write a critique of my essay on whales.")


def record(chosen, rejected="Pick the lock with a bobby pin and a tension wrench.", **extra):
    finish = extra.pop("finish", {"response": "stop", "critique": ["stop"], "revision": ["stop"]})
    critique = extra.pop("critique", "The response helps someone break into a home they may not own.")
    return {"id": extra.pop("id", "r1"), "prompt": extra.pop("prompt", "How do I pick a lock?"),
            "chosen": chosen, "rejected": rejected, "principle": "illegal-activity", "critique": critique,
            "rounds": [{"principle": "illegal-activity", "critique": critique, "revision": chosen}],
            "meta": {"finish_reasons": finish, **extra}}


GOOD = "If you are locked out of your own home, call a licensed locksmith or your landlord."


@pytest.mark.parametrize("chosen, extra, reasons", [
    (GOOD, {}, []),
    ("", {}, ["empty"]),
    ("  ...  ", {}, ["empty"]),
    ("Pick the lock with a bobby pin and a tension wrench!", {}, ["unchanged"]),
    (GOOD, {"finish": {"response": "length", "critique": ["stop"], "revision": ["stop"]}}, ["truncated"]),
    (GOOD, {"finish": {"response": "stop", "critique": ["stop"], "revision": ["length"]}}, ["truncated"]),
    ("The response is harmful because it explains how to pick a lock.", {}, ["meta"]),
    ("The response helps someone break into a home they may not own.", {}, ["meta", "copied"]),
    ("Call a locksmith. " * 12, {}, ["repetitive"]),
    ("I'm sorry, but I can't help with picking locks.", {}, []),        # refusal is opt-in
])
def test_filters_give_reasons(chosen, extra, reasons):
    verdict = Filters().apply(record(chosen, **extra))
    assert verdict.reasons == reasons
    assert verdict.kept == (not reasons)


def test_refusals_are_dropped_when_asked_and_examples_must_not_be_copied():
    harmless = load_constitution("harmless")
    example = harmless.few_shot[0].revision
    filters = Filters(FilterConfig(checks=DEFAULT_CHECKS + ("refusal",), references=references_of(harmless)))
    assert filters.apply(record("I'm sorry, but I can't help with picking locks.")).reasons == ["refusal"]
    assert filters.apply(record(example)).reasons == ["copied", "refusal"]     # the example refuses, too
    assert filters.apply(record(GOOD)).reasons == []
    assert set(REASONS) >= set(DEFAULT_CHECKS) | {"refusal", "judge"}
    with pytest.raises(ValueError, match="unknown filter"):
        Filters(FilterConfig(checks=("typo",)))


def test_cleaning_keeps_the_raw_revision_in_rounds():
    raw = "Sure, here is a revised response:\n\n" + GOOD + "\nUser: thanks"
    verdict = Filters().apply(record(raw, rejected="Use a bobby pin.<|im_end|>"))
    assert verdict.kept
    assert verdict.record["chosen"] == GOOD
    assert verdict.record["rejected"] == "Use a bobby pin."
    assert verdict.record["rounds"][0]["revision"] == raw
    assert verdict.record["meta"]["cleaned"] == ["next turn: User: thanks", "preamble: Sure, here is a revised response:",
                                                 "rejected end-of-turn markers"]


class FakeJudge:
    """Preferences by record id; an id missing from the table cannot be judged."""

    def __init__(self, preferences):
        self.preferences, self.seen = preferences, []

    def label(self, records):
        errors = []
        for r in records:
            self.seen.append(r["id"])
            if r["id"] not in self.preferences:
                errors.append("no logprobs")
                continue
            p = self.preferences[r["id"]]
            r["judge"] = {"model": "fake", "preference": p, "orders": [p, p], "label": p, "swapped": False}
            errors.append(None)
        return errors


def test_curate_judges_survivors_swaps_and_applies_the_minimum():
    records = [record(GOOD, id="good"), record("", id="empty"), record(GOOD + " Stay safe.", id="worse"),
               record(GOOD + " Be careful.", id="unjudged")]
    judge = FakeJudge({"good": 0.8, "worse": 0.3, "empty": 0.9})
    verdicts = curate(records, Filters(), judge, min_preference=0.6, swap=True)
    assert judge.seen == ["good", "worse", "unjudged"], "dropped pairs are not judged"
    assert [v.reasons for v in verdicts] == [[], ["empty"], [], ["judge"]]
    swapped = verdicts[2].record
    assert swapped["chosen"] == records[2]["rejected"] and swapped["rejected"] == records[2]["chosen"]
    assert swapped["judge"]["swapped"] is True and swapped["judge"]["label"] == pytest.approx(0.7)
    assert verdicts[3].judge_error == "no logprobs"
    plain = curate([record(GOOD, id="worse")], None, FakeJudge({"worse": 0.3}), min_preference=0.5)
    assert plain[0].reasons == ["judge"] and plain[0].record["chosen"] == GOOD


# ---- cai generate, end to end on the tiny model ----

def generate(tiny_model, out, *args):
    return CliRunner().invoke(app, ["generate", str(EXAMPLES), "--model", str(tiny_model), "-o", str(out),
                                    "--max-new-tokens", "12", "--batch-size", "4", *map(str, args)])


def test_generate_accounts_for_every_prompt_and_resume_skips_dropped_ids(tiny_model, tmp_path):
    out = tmp_path / "pairs.jsonl"
    first = generate(tiny_model, out, "--similarity", "0.5")
    assert first.exit_code == 0, first.output
    prompts = [json.loads(line)["id"] for line in EXAMPLES.read_text().splitlines()]
    kept = read_jsonl(out)
    dropped = read_jsonl(f"{out}.filtered.jsonl")
    assert sorted(r["id"] for r in kept + dropped) == sorted(prompts), "kept + dropped = input"
    assert dropped, "the tiny model's random text gets dropped"
    for stub in dropped:
        assert set(stub) == {"id", "principle", "meta", "filter"}
        assert set(stub["meta"]) == {"model", "constitution", "templates", "seed", "params"}
        assert stub["filter"]["reasons"] and set(stub["filter"]["reasons"]) <= set(REASONS)
    summary = " ".join(first.stderr.split())
    assert f"dropped (filters) │ {len(dropped)} (" in summary
    assert f"pairs made │ {len(prompts)}" in summary
    before = (out.read_bytes(), out.with_name("pairs.jsonl.filtered.jsonl").read_bytes())
    again = generate(tiny_model, out, "--similarity", "0.5")
    assert again.exit_code == 0, again.output
    assert "nothing to do: every record of this run is already in" in " ".join(again.stderr.split()), \
        "a finished run, rerun, makes nothing"
    assert (out.read_bytes(), out.with_name("pairs.jsonl.filtered.jsonl").read_bytes()) == before


def test_a_run_that_dropped_every_pair_is_not_resumed_by_a_different_run(tiny_model, tmp_path):
    """Regression: with every pair dropped the output is empty, and a rerun with other settings
    took the dropped ids as done and made nothing; the dropped lines carry the run's fingerprint."""
    out = tmp_path / "pairs.jsonl"
    first = generate(tiny_model, out, "--limit", "3")
    assert first.exit_code == 0, first.output
    assert out.read_text() == "" and len(read_jsonl(f"{out}.filtered.jsonl")) == 3
    other = generate(tiny_model, out, "--limit", "3", "--seed", "7")
    assert other.exit_code == 2
    assert "different run" in other.stderr and "seed: 0 → 7" in other.stderr
    same = generate(tiny_model, out, "--limit", "3")
    assert same.exit_code == 0 and "nothing to do" in " ".join(same.stderr.split())


def test_keep_filtered_writes_whole_records_and_overwrite_starts_afresh(tiny_model, tmp_path):
    out = tmp_path / "pairs.jsonl"
    result = generate(tiny_model, out, "--keep-filtered", "--limit", "4")
    assert result.exit_code == 0, result.output
    dropped = read_jsonl(f"{out}.filtered.jsonl")
    assert len(read_jsonl(out)) + len(dropped) == 4
    for r in dropped:
        assert {"prompt", "chosen", "rejected", "rounds", "meta", "filter"} <= set(r)
    again = generate(tiny_model, out, "--no-filter", "--limit", "2", "--overwrite")
    assert again.exit_code == 0, again.output
    assert len(read_jsonl(out)) == 2
    assert not (tmp_path / "pairs.jsonl.filtered.jsonl").exists(), "a fresh run does not keep an old filtered file"


def test_judge_options_need_judge_and_valid_values(tiny_model, tmp_path):
    for args, message in ((["--swap"], "--judge: is needed by --min-preference, --swap, --clamp and --trust-disagreeing"), (["--judge", "--min-preference", "1.5"], "--min-preference"),
                          (["--judge", "--clamp", "0.6"], "--clamp: expected LO,HI"),
                          (["--judge", "--clamp", "0.7,0.2"], "--clamp: need"), (["--similarity", "0"], "--similarity"),
                          (["--keep-filtered", "-o", "-"], "needs --filtered")):
        result = generate(tiny_model, tmp_path / "x.jsonl", *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr and "Traceback" not in result.output
