"""The AI-feedback judge: option-token log-probabilities, both orders, and `cai judge` / `cai
generate --judge` end to end on the tiny model."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from cai.backends.base import ChoiceScores
from cai.cli import app
from cai.constitution import load_constitution
from cai.judging import DEFAULT_QUESTION, Judge, JudgeConfig, preference_of
from cai.templates import load_templates
from conftest import ROOT, read_jsonl

EXAMPLES = ROOT / "examples" / "prompts.jsonl"


def test_preference_normalises_over_the_two_options():
    assert preference_of({"A": math.log(0.3), "B": math.log(0.1)}, "A") == pytest.approx(0.75)
    assert preference_of({"A": math.log(0.3), "B": math.log(0.1)}, "B") == pytest.approx(0.25)
    assert preference_of({"A": -math.inf, "B": -2.0}, "B") == 1.0
    assert preference_of({"A": -math.inf, "B": -math.inf}, "A") == 0.5
    assert preference_of({"A": -1000.0, "B": 0.0}, "A") == pytest.approx(0.0)


class ScriptedBackend:
    """Scores each judge conversation by which response sits in option (A): the revision gets
    P(A) = 0.9 as option A and P(B) = 0.6 as option B (a judge biased toward A)."""

    model_name = "scripted"

    def __init__(self):
        self.calls = []

    def score_choices(self, conversations, choices, prefix=""):
        self.calls.append((conversations, choices, prefix))
        out = []
        for conversation in conversations:
            text = conversation[-1]["content"]
            revision_first = text.index("(A) REVISION") >= 0 if "(A) REVISION" in text else False
            p_a = 0.9 if revision_first else 0.4
            out.append(ChoiceScores({"A": math.log(p_a), "B": math.log(1 - p_a)}))
        return out


def pair(principle="illegal-activity"):
    return {"id": "x", "prompt": "How do I pick a lock?", "chosen": "REVISION", "rejected": "ORIGINAL",
            "principle": principle}


def test_judge_scores_both_orders_and_averages():
    backend = ScriptedBackend()
    harmless = load_constitution("harmless")
    judge = Judge(backend, harmless, load_templates("default"), JudgeConfig(clamp=(0.4, 0.6)))
    records = [pair(), pair("no-such-principle")]
    assert judge.label(records) == [None, None]
    (conversations, choices, prefix), = backend.calls
    assert choices == ("A", "B") and prefix == "The answer is: ("
    assert len(conversations) == 4
    first, second = conversations[0][0]["content"], conversations[1][0]["content"]
    assert "(A) ORIGINAL\n(B) REVISION" in first and "(A) REVISION\n(B) ORIGINAL" in second
    assert "Human: How do I pick a lock?" in first
    assert harmless.principle("illegal-activity").choice in first
    assert DEFAULT_QUESTION in conversations[2][0]["content"]
    verdict = records[0]["judge"]
    assert verdict["orders"] == [pytest.approx(0.6), pytest.approx(0.9)]     # revision as (B), as (A)
    assert verdict["preference"] == pytest.approx(0.75)
    assert verdict["label"] == pytest.approx(0.6), "clamped"
    assert verdict["model"] == "scripted" and verdict["swapped"] is False


def test_a_swapped_record_is_judged_afresh():
    backend = ScriptedBackend()
    judge = Judge(backend, None, load_templates("default"))
    record = {**pair(), "chosen": "ORIGINAL", "rejected": "REVISION",
              "judge": {"preference": 0.2, "orders": [0.2, 0.2], "label": 0.8, "swapped": True}}
    judge.label([record])
    assert record["chosen"] == "REVISION" and record["judge"]["swapped"] is False
    assert record["judge"]["preference"] == pytest.approx(0.75)


def test_hf_scores_are_the_same_batched_or_alone(tiny_model):
    from cai.backends.hf import HFBackend

    backend = HFBackend(str(tiny_model), "tiny")
    conversations = [[{"role": "user", "content": "Which is better? (A) fox (B) dog"}],
                     [{"role": "user", "content": "the quick brown fox jumps over the lazy dog " * 6}],
                     [{"role": "user", "content": "hi"}]]
    together = backend.score_choices(conversations, ("A", "B"), prefix="The answer is: (")
    alone = [backend.score_choices([c], ("A", "B"), prefix="The answer is: (")[0] for c in conversations]
    for t, a in zip(together, alone):
        assert t.error is None and set(t.logprobs) == {"A", "B"}
        for choice in ("A", "B"):
            assert t.logprobs[choice] == pytest.approx(a.logprobs[choice], abs=1e-4)
            assert -30 < t.logprobs[choice] < 0
    assert together[0].logprobs != together[1].logprobs


def run(*args, input=None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


@pytest.fixture(scope="module")
def pairs(tiny_model, tmp_path_factory):
    """Unfiltered pairs of the tiny model (greedy), and the same run judged inline."""
    folder = tmp_path_factory.mktemp("judge")
    common = ["generate", EXAMPLES, "--model", tiny_model, "--max-new-tokens", "8", "--batch-size", "3",
              "--temperature", "0", "--no-filter", "--limit", "6"]
    plain, judged = folder / "plain.jsonl", folder / "judged.jsonl"
    for out, extra in ((plain, []), (judged, ["--judge"])):
        result = run(*common, "-o", out, *extra)
        assert result.exit_code == 0, result.output
    return plain, judged


def test_cai_judge_matches_generate_judge(pairs, tiny_model, tmp_path):
    plain, judged_inline = pairs
    out = tmp_path / "judged.jsonl"
    result = run("judge", plain, "--model", tiny_model, "-o", out, "--batch-size", "4")
    assert result.exit_code == 0, result.output
    standalone, inline = read_jsonl(out), read_jsonl(judged_inline)
    assert [r["id"] for r in standalone] == [r["id"] for r in read_jsonl(plain)]
    for a, b in zip(standalone, inline):
        # Judging between engine steps leaves the generation exactly as it was without a judge.
        assert (a["chosen"], a["rejected"], a["critique"]) == (b["chosen"], b["rejected"], b["critique"])
        assert a["judge"]["orders"] == pytest.approx(b["judge"]["orders"], abs=1e-4)
        assert 0 <= a["judge"]["preference"] <= 1
        assert a["judge"]["question"] == load_constitution("harmless").principle(a["principle"]).choice
    assert "judge: P(revision better)" in " ".join(result.stderr.split())


def test_cai_judge_min_preference_swap_and_clamp(pairs, tiny_model, tmp_path):
    plain, judged = pairs
    scored = read_jsonl(judged)
    preferences = sorted(r["judge"]["preference"] for r in scored)
    threshold = (preferences[2] + preferences[3]) / 2          # three above, three below
    out = tmp_path / "kept.jsonl"
    # the averaged preference decides (the tiny random judge's two orders often disagree, which
    # would otherwise count as a tie: tests/test_edits.py covers that rule)
    result = run("judge", plain, "--model", tiny_model, "-o", out, "--min-preference", threshold, "--clamp", "0.4,0.6",
                 "--trust-disagreeing")
    assert result.exit_code == 0, result.output
    kept, dropped = read_jsonl(out), read_jsonl(f"{out}.filtered.jsonl")
    assert len(kept) == 3 and len(dropped) == 3
    assert all(r["judge"]["preference"] >= threshold for r in kept)
    assert all(0.4 <= r["judge"]["label"] <= 0.6 for r in kept)
    assert all(d["filter"]["reasons"] == ["judge"] for d in dropped)

    swapped_out = tmp_path / "swapped.jsonl"
    result = run("judge", plain, "--model", tiny_model, "-o", swapped_out, "--swap")
    assert result.exit_code == 0, result.output
    by_id = {r["id"]: r for r in read_jsonl(plain)}
    for r in read_jsonl(swapped_out):
        original = by_id[r["id"]]
        if r["judge"]["preference"] < 0.5:
            assert r["judge"]["swapped"] and (r["chosen"], r["rejected"]) == (original["rejected"], original["chosen"])
            assert r["judge"]["label"] == pytest.approx(1 - r["judge"]["preference"], abs=1e-6)
        else:
            assert not r["judge"]["swapped"] and r["chosen"] == original["chosen"]


def test_cai_judge_reads_conversational_records_and_stdin(pairs, tiny_model, tmp_path):
    plain, _ = pairs
    chat = tmp_path / "chat.jsonl"
    assert run("export", plain, "--format", "conversational", "-o", chat).exit_code == 0
    result = run("judge", "-", "--model", tiny_model, "-q", input=chat.read_text())
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 6 and all(isinstance(r["chosen"], list) and "judge" in r for r in records)
    assert result.stderr == ""


def test_cai_judge_bad_input(pairs, tiny_model, tmp_path):
    plain, _ = pairs
    exists = tmp_path / "exists.jsonl"
    exists.write_text("")
    torn = tmp_path / "torn.jsonl"
    torn.write_text(plain.read_text() + '{"id": "x", "prom')
    for args, message in (([exists, "--dtype", "nonsense"], "--dtype: unknown value 'nonsense'"),   # before the input
                          ([plain, "--threads", "0"], "--threads: must be at least 1"),
                          ([plain, "--batch-size", "0"], "--batch-size: must be at least 1"),([tmp_path / "missing.jsonl"], "missing.jsonl: no such file"),
                          ([plain, "-o", exists], "exists; pass --overwrite"),
                          ([plain, "-o", plain], "exists; pass --overwrite"),
                          ([torn], "torn.jsonl:7: not a whole JSON record"),
                          ([plain, "--clamp", "a,b"], "--clamp"),
                          ([plain, "--backend", "openai"], "--backend: openai needs --base-url")):
        result = run("judge", *args, "--model", tiny_model)
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.stderr.split()) and "Traceback" not in result.output


# --- issue 31: what a server's logprobs can hold --------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.7])
def test_a_logprob_that_is_not_one_is_a_judge_error_never_a_preference(bad, tmp_path):
    """NaN from a server's logprobs once became `"preference": NaN` (not JSON) and passed
    --min-preference 0.9; now such a pair is unjudged, dropped for "judge", and no NaN is written."""
    from fault_proxy import FakeOpenAI

    top = [{"token": "A", "logprob": bad, "top_logprobs": [{"token": "A", "logprob": bad},
                                                            {"token": "B", "logprob": -1.0}]}]
    reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "A"},
                          "logprobs": {"content": top}}],
             "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"id": str(i), "prompt": "Name a colour.", "chosen": "Blue.",
                                         "rejected": "No.", "principle": "p"}) + "\n" for i in range(2)))
    out = tmp_path / "judged.jsonl"
    with FakeOpenAI(lambda body, n: (200, reply), models=["fake"]) as url:
        result = run("judge", pairs, "--backend", "openai", "--base-url", url, "--model", "fake", "-o", out,
                     "--min-preference", "0.9")
    text = " ".join(result.stderr.split())
    assert result.exit_code == 1, result.output
    assert "not a log-probability" in text and "no pair could be judged (2 failed)" in text
    assert "NaN" not in out.read_text() and read_jsonl(out) == []
    assert [r["filter"]["reasons"] for r in read_jsonl(f"{out}.filtered.jsonl")] == [["judge"], ["judge"]]


def test_generate_judge_against_a_server_without_logprobs_exits_1(tmp_path):
    """Issue 31: `generate --judge` against a server that gives no logprobs judged nothing and
    exited 0 (`cai judge` exits 1 in the same case)."""
    from fault_proxy import FakeOpenAI, chat_reply

    def respond(body, n):
        last = body["messages"][-1]["content"]
        return 200, chat_reply("A careful, safer answer." if "improved" in last or "Rewrite" in last else
                               "It could be safer." if "critique" in last.lower() else "Just do it.")

    out = tmp_path / "pairs.jsonl"
    with FakeOpenAI(respond, models=["fake"]) as url:
        result = run("generate", EXAMPLES, "--backend", "openai", "--base-url", url, "--model", "fake",
                     "-o", out, "-n", "2", "--judge", "--no-filter")
    assert result.exit_code == 1, result.output
    assert len(read_jsonl(out)) == 2 and all("judge" not in r for r in read_jsonl(out))
    [error] = [line for line in " ".join(result.stderr.split()).split("error: ")[1:]]
    assert "2 pairs could not be judged (the server returned no logprobs" in error
    assert "kept without a label" in error and "cai judge" in error
    with FakeOpenAI(respond, models=["fake"]) as url:      # under a minimum the pairs are dropped, and say where
        result = run("generate", EXAMPLES, "--backend", "openai", "--base-url", url, "--model", "fake",
                     "-o", tmp_path / "min.jsonl", "-n", "2", "--judge", "--min-preference", "0.6", "--no-filter")
    assert result.exit_code == 1, result.output
    assert "dropped (listed in" in " ".join(result.stderr.split())
    assert len(read_jsonl(f"{tmp_path / 'min.jsonl'}.filtered.jsonl")) == 2


def test_cai_judge_refuses_a_filtered_file_that_is_not_cai_s(pairs, tiny_model, tmp_path):
    """Issue 31: judge's --filtered FILE on someone else's file is refused before the model loads
    and left as it was, unless --overwrite."""
    plain, _ = pairs
    notes = tmp_path / "notes.jsonl"
    notes.write_text("my notes\n")
    base = ["judge", plain, "--model", tiny_model, "-o", tmp_path / "judged.jsonl", "--filtered", notes, "-q"]
    result = run(*base)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert (f"--filtered: {notes} exists and is not a cai filtered file (line 1 is not a cai record)"
            in " ".join(result.stderr.split())), result.stderr
    assert notes.read_text() == "my notes\n" and not (tmp_path / "judged.jsonl").exists()
    result = run(*base, "--overwrite", "--min-preference", "0.99")
    assert result.exit_code == 0, result.output
    assert not notes.exists() or notes.read_text() != "my notes\n"


def test_a_backend_that_cannot_score_is_refused_as_judge_in_one_line(tmp_path):
    """Capabilities are protocols checked with isinstance: a backend without score_choices is
    no judge, said before any pair is read."""
    from cai.backends.base import LockstepStream, Scoring, ThinkingSwitch
    from cai.errors import OptionError
    from cai.judging import Judge
    from cai.templates import load_templates

    class TextOnly:
        model_name, context_length = "text-only", None

        def count_tokens(self, conversation):
            return 1

        def default_width(self):
            return 1

        def stream(self, params, width, longest=None, on_text=None):
            return LockstepStream(self, params, width, on_text)

        def close(self):
            pass

    backend = TextOnly()
    assert not isinstance(backend, Scoring) and not isinstance(backend, ThinkingSwitch)
    with pytest.raises(OptionError, match="text-only cannot be a judge"):
        Judge(backend, None, load_templates("default"))
