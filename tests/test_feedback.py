"""issue 33: the paper's second stage, sampled pairs labelled by a feedback model (cai.feedback),
with scripted backends (milliseconds, exact figures) and end to end on the tiny model."""

from __future__ import annotations

import json
import math
import re

import pytest
from typer.testing import CliRunner

from cai.backends.base import ChoiceScores, Completion
from cai.cli import app
from cai.constitution import load_constitution
from cai.errors import OptionError
from cai.options import GenerateOptions
from cai.run.generate import run
from conftest import ROOT, plumbing, read_jsonl
from cai.backends.scripted import ScriptedBackend

PROMPTS = [f"How do I make tea number {i}?" for i in range(6)]
EXAMPLES = ROOT / "examples" / "prompts.jsonl"


class SampledBackend(ScriptedBackend):
    """Answers whose length depends on the request's seed (so N samples differ), and a feedback
    side that prefers the longer answer: P(A) = len(A) / (len(A) + len(B)), with a bias toward (A)
    of `bias` (so the two orders differ). `fail_feedback`: prompts whose comparisons fail."""

    def __init__(self, bias: float = 0.05, fail_feedback: set[str] = frozenset(), **kwargs):
        super().__init__(**kwargs)
        self.bias, self.fail_feedback = bias, set(fail_feedback)
        self.scored: list[list[dict]] = []
        self.generated: list[list[dict]] = []

    def stream(self, params, width, longest=None):
        return SeededStream(self, width)

    def score_choices(self, conversations, choices, prefix=""):
        out = []
        for conversation in conversations:
            self.scored.append(conversation)
            text = conversation[-1]["content"]
            if any(p in text for p in self.fail_feedback):
                out.append(ChoiceScores({}, error="scripted feedback failure"))
                continue
            a, b = re.search(r"\(A\) (.*)\n\(B\) (.*)\n", text).groups()
            p_a = min(0.99, len(a) / (len(a) + len(b)) + self.bias)
            out.append(ChoiceScores({"A": math.log(p_a), "B": math.log(1 - p_a)}))
        return out

    def generate(self, conversations, params, seed=None):
        self.generated += conversations
        return [Completion(f"Option one is longer by {len(c[-1]['content']) % 7} words.", "stop", 10, 8)
                for c in conversations]


class SeededStream:
    def __init__(self, backend, width):
        self.backend, self.width, self.waiting = backend, width, []

    def submit(self, request):
        self.waiting.append(request)

    def poll(self):
        batch, self.waiting = self.waiting[:self.width], self.waiting[self.width:]
        out = []
        for request in batch:
            prompt = request.conversation[-1]["content"]
            if any(p in prompt for p in self.backend.fail):
                out.append((request.key, Completion("", "error", 0, 0, error="scripted failure")))
                continue
            words = 3 + request.seed % 11
            out.append((request.key, Completion(" ".join(["tea"] * words) + f" ({request.seed})", "stop", 5, words)))
        return out

    def release(self, key):
        pass


def options(backend, **extra) -> GenerateOptions:
    return GenerateOptions(model=backend, **{"filter": False, "max_new_tokens": 16, "samples": 2, **extra})


def prompts_file(tmp_path, prompts=PROMPTS):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def without_created(records):
    return {r["id"]: {**r, "meta": {k: v for k, v in r["meta"].items() if k != "created"}} for r in records}


def test_two_samples_make_one_pair_per_prompt_the_longer_chosen(tmp_path):
    out = tmp_path / "out.jsonl"
    summary = run(prompts_file(tmp_path), str(out), options(SampledBackend()))
    assert summary.complete and summary.kept == len(PROMPTS) == summary.pairs
    records = read_jsonl(out)
    assert [r["prompt"] for r in records] == PROMPTS
    for r in records:
        fb = r["meta"]["feedback"]
        assert len(r["chosen"]) >= len(r["rejected"])
        assert fb["samples"] in ([0, 1], [1, 0]) and len(fb["principles"]) == 1 and len(fb["orders"]) == 1
        first_as_a, first_as_b = fb["orders"][0]
        assert fb["preference"] == pytest.approx((first_as_a + first_as_b) / 2, abs=1e-6)
        assert fb["preference"] >= 0.5 and fb["label"] == fb["preference"]       # no clamp
        assert fb["agreement"] == (1.0 if fb["agree"][0] else 0.0)
        assert r["judge"]["preference"] == fb["preference"] and r["judge"]["orders"] == [first_as_b, first_as_a]
        assert r["meta"]["params"]["feedback"]["samples"] == 2 and r["meta"]["params"]["revisions"] == 0
        assert r["principle"] == fb["principles"][0]


def test_four_samples_best_against_worst_and_k_principles(tmp_path):
    harmless = load_constitution("harmless")
    summary = run(PROMPTS, None, options(SampledBackend(), samples=4, principles_per_comparison=4))
    assert summary.kept == len(PROMPTS)
    for r in summary.records:
        fb = r["meta"]["feedback"]
        scores = {int(k): v for k, v in fb["scores"].items()}
        assert sorted(scores) == [0, 1, 2, 3]
        best, worst = fb["samples"]
        assert scores[best] == max(scores.values()) and scores[worst] == min(scores.values())
        assert len(fb["principles"]) == 4 == len(set(fb["principles"])) == len(fb["orders"])
        assert all(p in {q.id for q in harmless.principles} for p in fb["principles"])
    # K principles × 2 orders × 6 comparisons, per prompt
    again = run(PROMPTS, None, options(SampledBackend(), samples=4, principles_per_comparison=4, batch_size=1))
    assert without_created(again.records) == without_created(summary.records), "batching changes nothing"


def test_min_margin_writes_every_decided_pair_and_drops_a_prompt_with_none(tmp_path):
    out = tmp_path / "out.jsonl"
    summary = run(prompts_file(tmp_path), str(out), options(SampledBackend(bias=0.0), samples=4, min_margin=0.2))
    records = read_jsonl(out)
    assert records and all(re.fullmatch(r"[0-9a-f]+#[0-3]-[0-3]", r["id"]) for r in records)
    assert all(abs(2 * r["meta"]["feedback"]["preference"] - 1) >= 0.2 for r in records)
    assert summary.pairs == len(records) and summary.kept + summary.dropped == len(PROMPTS) == summary.planned
    # all of them at a margin nothing reaches: every prompt dropped, and said why
    out2 = tmp_path / "none.jsonl"
    none = run(prompts_file(tmp_path), str(out2), options(SampledBackend(), samples=2, min_margin=1.0))
    assert none.dropped == len(PROMPTS) and none.kept == 0 and read_jsonl(out2) == []
    drops = read_jsonl(f"{out2}.filtered.jsonl")
    assert [d["filter"]["reasons"] for d in drops] == [["margin"]] * len(PROMPTS)
    rerun = run(prompts_file(tmp_path), str(out2), options(SampledBackend(), samples=2, min_margin=1.0))
    assert rerun.nothing_to_do, "dropped prompts count as done"


def test_a_comparison_that_cannot_be_scored_fails_its_prompt_and_a_rerun_retries_it(tmp_path):
    out = tmp_path / "out.jsonl"
    summary = run(prompts_file(tmp_path), str(out), options(SampledBackend(fail_feedback={PROMPTS[2]})))
    assert summary.failed == 1 and summary.kept == len(PROMPTS) - 1 and summary.exit_code == 1
    (failure,) = read_jsonl(f"{out}.failures.jsonl")
    assert failure["stage"] == "feedback" and failure["error"] == "scripted feedback failure"
    fixed = run(prompts_file(tmp_path), str(out), options(SampledBackend()))
    assert fixed.resumed == len(PROMPTS) - 1 and fixed.kept == 1 and fixed.complete
    # a sample the policy could not make
    out2 = tmp_path / "sample.jsonl"
    failed = run(prompts_file(tmp_path), str(out2), options(SampledBackend(fail={PROMPTS[0]})))
    assert failed.failed == 1 and read_jsonl(f"{out2}.failures.jsonl")[0]["stage"].startswith("sample")


def test_a_stopped_run_resumed_makes_the_records_of_an_uncut_one(tmp_path):
    whole = tmp_path / "whole.jsonl"
    run(prompts_file(tmp_path), str(whole), options(SampledBackend(), samples=3, batch_size=3))
    cut = tmp_path / "cut.jsonl"
    calls = iter(range(1000))
    first = run(prompts_file(tmp_path), str(cut), options(SampledBackend(), samples=3, batch_size=3),
                stop=lambda: next(calls) >= 2)
    assert first.stopped_by and 0 < first.kept < len(PROMPTS) and first.not_made
    backend = SampledBackend()
    second = run(prompts_file(tmp_path), str(cut), options(backend, samples=3, batch_size=6))
    assert second.resumed == first.kept and second.complete
    asked = {c[-1]["content"] for c in backend.scored}
    assert not any(r["prompt"] in text for r in read_jsonl(cut)[:first.kept] for text in asked), "nothing redone"
    assert without_created(read_jsonl(cut)) == without_created(read_jsonl(whole))
    with pytest.raises(OptionError, match="different run.*samples"):
        run(prompts_file(tmp_path), str(cut), options(SampledBackend(), samples=4))


def test_a_separate_feedback_model_gives_the_labels(tmp_path):
    policy, feedback = SampledBackend(model_name="policy-model"), SampledBackend(model_name="feedback-model")
    summary = run(PROMPTS, None, options(policy, judge_model=feedback))
    assert not policy.scored and feedback.scored and not feedback.closed, "the caller's backend stays open"
    record = summary.records[0]
    assert record["meta"]["model"] == "policy-model" and record["meta"]["feedback"]["model"] == "feedback-model"
    assert record["meta"]["params"]["feedback"]["model"] == "feedback-model"


def test_cot_reasons_first_stores_it_apart_and_clamps(tmp_path):
    backend = SampledBackend(bias=0.3)
    summary = run(PROMPTS, None, options(backend, cot=True))
    assert backend.generated and all(c[-1]["content"].endswith("Let's think step by step.") for c in backend.generated)
    for r in summary.records:
        fb = r["meta"]["feedback"]
        assert 0.4 <= fb["label"] <= 0.6 and r["judge"]["label"] == fb["label"]
        ((as_a, as_b),) = fb["cot"]
        assert as_a.startswith("Option one") and "Option one" not in r["chosen"]
    assert summary.records[0]["meta"]["params"]["feedback"]["clamp"] == [0.4, 0.6]
    unclamped = run(PROMPTS, None, options(SampledBackend(bias=0.3), cot=True, clamp="0,1"))
    assert any(r["meta"]["feedback"]["label"] > 0.6 for r in unclamped.records)


@pytest.mark.parametrize("extra, option", [
    ({"samples": 1}, "samples"),
    ({"samples": 2, "principles_per_comparison": 15}, "principles_per_comparison"),
    ({"samples": None, "cot": True}, "cot"),
    ({"samples": None, "min_margin": 0.5}, "min_margin"),
    ({"samples": None, "principles_per_comparison": 2}, "principles_per_comparison"),
    ({"samples": 2, "judge": True}, "judge"),
    ({"samples": 2, "min_margin": 1.5}, "min_margin"),
    ({"samples": 2, "judge_backend": "openai"}, "judge_backend"),
    ({"samples": None, "judge_model": "x"}, "judge_model"),
    ({"samples": 2, "sampling": "cycle"}, "sampling"),
    ({"samples": 2, "revisions": 2}, "revisions"),
    ({"samples": 2, "critique": False}, "critique"),
])
def test_bad_options_are_one_line_before_anything_runs(tmp_path, extra, option):
    backend = SampledBackend()
    with pytest.raises(OptionError) as caught:
        run(PROMPTS, None, options(backend, **extra))
    assert caught.value.option == option and "\n" not in str(caught.value)
    assert backend.calls == 0 and not backend.scored


def test_a_feedback_model_without_log_probabilities_is_refused(tmp_path):
    class NoScores:
        model_name = "no-scores"

        def stream(self, *a, **k):      # an open backend, but it cannot score options
            raise AssertionError("never opened")

    with pytest.raises(OptionError, match="judge_model: no-scores gives no option log-probabilities"):
        run(PROMPTS, None, options(SampledBackend(), judge_model=NoScores()))


# --- the tiny model, end to end ------------------------------------------------------------------

def cli(*args):
    return CliRunner().invoke(app, plumbing(args))


@pytest.mark.parametrize("samples, k", [(2, 1), (4, 4)])
def test_tiny_model_samples_and_principles(tiny_model, tmp_path, samples, k):
    out = tmp_path / "pairs.jsonl"
    result = cli("generate", EXAMPLES, "--model", tiny_model, "-o", out, "--max-new-tokens", "8", "--no-filter",
                 "--samples", samples, "--principles-per-comparison", k, "--limit", "3", "--temperature", "1.0")
    assert result.exit_code == 0, result.output
    records = read_jsonl(out)
    assert len(records) == 3
    for r in records:
        fb = r["meta"]["feedback"]
        assert len(fb["principles"]) == k and len(fb["scores"]) == samples
        assert 0.5 <= fb["preference"] <= 1 and all(0 <= p <= 1 for o in fb["orders"] for p in o)
        assert r["chosen"] != r["rejected"]


def test_tiny_model_separate_feedback_model_cot_conversational(tiny_model, thinking_model, tmp_path):
    out = tmp_path / "pairs.jsonl"
    result = cli("generate", EXAMPLES, "--model", tiny_model, "--judge-model", thinking_model, "-o", out,
                 "--max-new-tokens", "8", "--no-filter", "--samples", "2", "--cot", "--limit", "2",
                 "--format", "conversational")
    assert result.exit_code == 0, result.output
    records = read_jsonl(out)
    assert len(records) == 2
    for r in records:
        assert r["prompt"][-1]["role"] == "user" and r["chosen"][0]["role"] == "assistant"
        fb = r["meta"]["feedback"]
        assert fb["model"] != r["meta"]["model"] and len(fb["cot"][0]) == 2
        assert 0.4 <= fb["label"] <= 0.6


def test_tiny_model_resume_and_batch_size_give_the_same_records(tiny_model, tmp_path):
    common = ["--model", tiny_model, "--max-new-tokens", "6", "--no-filter", "--samples", "2", "--limit", "4"]
    whole, other = tmp_path / "whole.jsonl", tmp_path / "other.jsonl"
    assert cli("generate", EXAMPLES, "-o", whole, "-b", "4", *common).exit_code == 0
    assert cli("generate", EXAMPLES, "-o", other, "-b", "2", *common).exit_code == 0
    assert without_created(read_jsonl(other)) == without_created(read_jsonl(whole))
    # a run cut after its first records, resumed, ends as the uncut one
    cut = tmp_path / "cut.jsonl"
    calls = iter(range(1000))
    import cai

    first = cai.generate(str(EXAMPLES), str(cut), model=str(tiny_model), max_new_tokens=6, filter=False, samples=2,
                         limit=4, batch_size=2, stop=lambda: next(calls) >= 1)
    assert 0 < first.kept < 4
    assert cli("generate", EXAMPLES, "-o", cut, "-b", "4", *common).exit_code == 0
    assert without_created(read_jsonl(cut)) == without_created(read_jsonl(whole))


# --- the first stage's variants: --no-critique, --keep-rounds ------------------------------------

def test_no_critique_revises_directly_against_the_principle(tmp_path):
    summary = run(PROMPTS[:2], None, GenerateOptions(model=ScriptedBackend(), filter=False, samples=None,
                                                      critique=False, revisions=2))
    assert summary.kept == 2
    for r in summary.records:
        assert [set(k for k in rnd) for rnd in r["rounds"]] == [{"principle", "critique", "revision"}] * 2
        assert all(rnd["critique"] is None for rnd in r["rounds"]) and r["critique"] is None
        assert r["meta"]["finish_reasons"] == {"response": "stop", "critique": [], "revision": ["stop", "stop"]}
        assert r["meta"]["params"]["critique"] is False


def test_no_critique_conversation_has_no_critique_turns(tmp_path):
    from cai.pipeline import Pipeline, RunConfig
    from cai.templates import load_templates

    seen = []

    class Recording(ScriptedBackend):
        def stream(self, params, width, longest=None):
            stream = super().stream(params, width, longest)
            submit = stream.submit
            stream.submit = lambda request: (seen.append(request.conversation), submit(request))[1]
            return stream

    harmless = load_constitution("harmless")
    pipeline = Pipeline(Recording(), harmless, load_templates("default"), RunConfig(revisions=2, critique=False))
    jobs, _ = pipeline.plan(__import__("cai.inputs", fromlist=["x"]).read_prompts(str(prompts_file(tmp_path))))
    (batch, *_), = [list(pipeline.run(jobs[:1]))]
    last = max(seen, key=len)
    critique_text = "Write a short critique"
    assert not any(critique_text in m["content"] for m in last)
    roles = [m["role"] for m in last]
    assert roles[-4:] == ["assistant", "user", "assistant", "user"]        # response, revise 1, revision, revise 2


def test_keep_rounds_writes_each_round_as_a_pair(tmp_path):
    out = tmp_path / "out.jsonl"
    summary = run(prompts_file(tmp_path, PROMPTS[:3]), str(out),
                  GenerateOptions(model=ScriptedBackend(), filter=False, revisions=3, keep_rounds=True))
    records = read_jsonl(out)
    assert summary.kept == 3 and summary.pairs == 9 and len(records) == 9
    main = [r for r in records if "#" not in r["id"]]
    for r in main:
        r1, r2 = (next(x for x in records if x["id"] == f"{r['id']}#r{k}") for k in (1, 2))
        assert r1["rejected"] == r["rejected"] and r1["chosen"] == r["rounds"][0]["revision"]
        assert r2["rejected"] == r["rounds"][0]["revision"] and r2["chosen"] == r["rounds"][1]["revision"]
        assert r2["principle"] == r["rounds"][1]["principle"] and r2["meta"]["round"] == 2
    again = run(prompts_file(tmp_path, PROMPTS[:3]), str(out),
                GenerateOptions(model=ScriptedBackend(), filter=False, revisions=3, keep_rounds=True))
    assert again.nothing_to_do and again.removed == 0


def test_tiny_model_no_critique_and_keep_rounds(tiny_model, tmp_path):
    out = tmp_path / "pairs.jsonl"
    result = cli("generate", EXAMPLES, "--model", tiny_model, "-o", out, "--max-new-tokens", "6", "--no-filter",
                 "--no-critique", "--revisions", "2", "--keep-rounds", "--limit", "2")
    assert result.exit_code == 0, result.output
    records = read_jsonl(out)
    assert len(records) == 4 and sum("#r1" in r["id"] for r in records) == 2
    assert all(rnd["critique"] is None for r in records for rnd in r["rounds"])


# --- few-shot examples for the feedback model, from the constitution ------------------------------

FEEDBACK_YAML = """\
name: fb
principles:
  - id: be-honest
    critique: Point out anything false.
    revision: Rewrite it truthfully.
    choice: Which response is more honest?
feedback_examples:
  - principle: be-honest
    prompt: How many moons does Mars have?
    a: Two, Phobos and Deimos.
    b: None.
    reasoning: Mars has two moons; B is false.
    answer: A
"""


def test_feedback_examples_are_earlier_turns_of_every_comparison(tmp_path):
    path = tmp_path / "fb.yaml"
    path.write_text(FEEDBACK_YAML)
    backend = SampledBackend()
    run(PROMPTS[:1], None, options(backend, constitution=str(path)))
    conversation = backend.scored[0]
    assert [m["role"] for m in conversation] == ["user", "assistant", "user"]
    assert "Which response is more honest?" in conversation[0]["content"]
    assert "(A) Two, Phobos and Deimos.\n(B) None." in conversation[0]["content"]
    assert conversation[1]["content"] == "The answer is: (A)"
    cot = SampledBackend()
    run(PROMPTS[:1], None, options(cot, constitution=str(path), cot=True))
    assert cot.generated[0][1]["content"] == "Mars has two moons; B is false.\nThe answer is: (A)"


@pytest.mark.parametrize("edit, where, message", [
    ("    answer: A\n", "feedback_examples[0].answer", "must be A or B (got 'C')"),
    ("  - principle: be-honest\n", "feedback_examples[0].principle", "no principle with id 'nope'"),
    ("    b: None.\n", "feedback_examples[0].b", "missing required key"),
])
def test_bad_feedback_examples_name_file_line_and_field(tmp_path, edit, where, message):
    from cai.constitution import load_constitution as load
    from cai.errors import ConstitutionError

    text = FEEDBACK_YAML.replace(edit, {"    answer: A\n": "    answer: C\n",
                                        "  - principle: be-honest\n": "  - principle: nope\n",
                                        "    b: None.\n": ""}[edit])
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConstitutionError) as caught:
        load(str(path))
    shown = str(caught.value)
    assert str(path) in shown and where in shown and message in shown and re.search(r":\d+:\d+", shown), shown
    assert "\n" not in shown


def test_the_starter_constitution_has_a_feedback_example():
    from cai.constitution import parse_constitution, starter_text

    starter = parse_constitution(starter_text(), "constitution.yaml")
    (example,) = starter.feedback_examples
    assert example.answer == "A" and example.principle == "be-honest" and example.reasoning


# --- stats, export and the dataset card of sampled pairs --------------------------------------------

def test_stats_export_and_card_of_sampled_pairs(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    run(prompts_file(tmp_path), str(pairs), options(SampledBackend(), samples=3, principles_per_comparison=3))
    records = read_jsonl(pairs)
    result = cli("stats", pairs, "--json")
    assert result.exit_code == 0, result.output
    feedback = json.loads(result.stdout)["feedback"]
    labels = sorted(r["meta"]["feedback"]["label"] for r in records)
    assert feedback["pairs"] == len(records) and feedback["label"]["min"] == pytest.approx(labels[0])
    assert sum(feedback["histogram"]["counts"]) == len(records)
    asked = sum(len(r["meta"]["feedback"]["principles"]) for r in records)
    assert sum(row["asked"] for row in feedback["principles"].values()) == asked
    for name, row in feedback["principles"].items():
        means = [sum(o) / 2 for r in records for p, o in zip(r["meta"]["feedback"]["principles"],
                                                              r["meta"]["feedback"]["orders"]) if p == name]
        assert row["win_rate"] == pytest.approx(sum(m > 0.5 for m in means) / len(means), abs=1e-6)
    tables = cli("stats", pairs)
    assert "feedback (sampled pairs)" in tables.stderr and "chosen wins" in tables.stderr
    for trainer in ("trl", "axolotl", "openrlhf", "llamafactory", "nemo-rl"):
        folder = tmp_path / trainer
        exported = cli("export", pairs, "--to", trainer, folder)
        assert exported.exit_code == 0, exported.output
        card = (folder / "README.md").read_text()
        assert "## AI feedback on sampled pairs" in card and "chosen wins" in card
    rows = read_jsonl(tmp_path / "trl" / "data" / "train.jsonl")
    by_chosen = {r["chosen"]: r for r in records}
    for row in rows:
        label = by_chosen[row["chosen"][0]["content"]]["judge"]["label"]
        assert row["margin"] == pytest.approx(math.log(label / (1 - label)), abs=1e-5)


# --- the feedback model on a server: one of each, both servers, and one without logprobs ----------

def _fake_feedback(with_logprobs: bool = True, reply: str = "Boil water, then pour."):
    from fault_proxy import FakeOpenAI, chat_reply
    from test_openai_backend import chat_logprobs

    def respond(body, n):
        if body.get("logprobs"):
            if not with_logprobs:
                return 200, chat_reply("A")
            # prefers whichever answer is shown as (A) a little, and the shorter one more
            text = body["messages"][-2]["content"] if body["messages"][-1]["role"] == "assistant" \
                else body["messages"][-1]["content"]
            a, b = re.search(r"\(A\) (.*)\n\(B\) (.*)\n", text, re.S).groups()
            p_a = 0.55 if len(a) <= len(b) else 0.35
            return 200, chat_logprobs(("A", math.log(p_a)), ("B", math.log(1 - p_a)))
        return 200, chat_reply(reply + f" ({n})")
    return FakeOpenAI(respond, models=["fake"])


def test_a_local_policy_with_a_feedback_model_on_a_server(tiny_model, tmp_path):
    pytest.importorskip("httpx")
    out = tmp_path / "pairs.jsonl"
    with _fake_feedback() as url:
        result = CliRunner().invoke(app, plumbing([
            "generate", EXAMPLES, "--model", tiny_model, "-o", out, "--limit", "2", "--max-new-tokens", "6",
            "--no-filter", "--samples", "2", "--judge-backend", "openai", "--judge-base-url", url,
            "--judge-model", "fake", "--temperature", "1.0"]), env={"OPENAI_API_KEY": None})
    assert result.exit_code == 0, result.output
    for record in read_jsonl(out):
        fb = record["meta"]["feedback"]
        assert fb["model"] == "fake" and record["meta"]["model"] != "fake"
        assert len(record["chosen"]) <= len(record["rejected"]) or fb["preference"] == 0.5


def test_both_models_on_servers(tmp_path):
    pytest.importorskip("httpx")
    out = tmp_path / "pairs.jsonl"
    with _fake_feedback(reply="An answer") as policy, _fake_feedback() as feedback:
        result = CliRunner().invoke(app, plumbing([
            "generate", EXAMPLES, "--backend", "openai", "--base-url", policy, "--model", "fake", "-o", out,
            "--limit", "2", "--max-new-tokens", "6", "--no-filter", "--samples", "3", "--judge-base-url", feedback,
            "--judge-model", "fake", "--principles-per-comparison", "2"]), env={"OPENAI_API_KEY": None})
    assert result.exit_code == 0, result.output
    records = read_jsonl(out)
    assert len(records) == 2 and all(len(r["meta"]["feedback"]["principles"]) == 2 for r in records)


def test_a_feedback_server_without_logprobs_stops_the_run_in_one_line(tmp_path):
    pytest.importorskip("httpx")
    out = tmp_path / "pairs.jsonl"
    with _fake_feedback(reply="An answer") as policy, _fake_feedback(with_logprobs=False) as feedback:
        result = CliRunner().invoke(app, plumbing([
            "generate", EXAMPLES, "--backend", "openai", "--base-url", policy, "--model", "fake", "-o", out,
            "--limit", "3", "--max-new-tokens", "6", "--no-filter", "--samples", "2", "--judge-base-url", feedback,
            "--judge-model", "fake"]), env={"OPENAI_API_KEY": None})
    assert result.exit_code != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the feedback model fake cannot be scored" in errors[0]
    assert "returned no logprobs" in errors[0] and "Traceback" not in result.output


@pytest.mark.slow
def test_tiny_model_sigterm_then_resume_gives_the_records_of_an_uncut_run(tiny_model, tmp_path):
    """A real SIGTERM to `cai generate --samples`: the prompts in flight finish, the run exits
    143, and the rerun resumes (no prompt sampled again) to the records of an uncut run."""
    import signal
    import subprocess
    import sys
    import time

    prompts = tmp_path / "many.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i:02d}", "prompt": f"Tell me about river number {i}."}) + "\n"
                               for i in range(24)))
    common = [prompts, "--model", tiny_model, "--max-new-tokens", "12", "--no-filter", "--samples", "2",
              "--no-few-shot", "--principles-per-comparison", "2"]
    whole = tmp_path / "whole.jsonl"
    assert cli("generate", *common, "-o", whole, "-b", "4").exit_code == 0
    cut = tmp_path / "cut.jsonl"
    command = [sys.executable, "-m", "cai", *plumbing(("generate", *common, "-o", cut, "-b", "2"))]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not (cut.exists() and cut.read_bytes().count(b"\n")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=120)[1].decode()
    made = read_jsonl(cut)
    assert proc.returncode == 143 and 0 < len(made) < 24, stderr
    resumed = cli("generate", *common, "-o", cut, "-b", "3")
    assert resumed.exit_code == 0 and f"{len(made)} records already there" in " ".join(resumed.stderr.split()), \
        resumed.stderr
    assert without_created(read_jsonl(cut)) == without_created(read_jsonl(whole))


def test_filters_drop_sampled_pairs_and_a_dropped_prompt_is_done(tmp_path):
    out = tmp_path / "out.jsonl"
    # the plain scripted backend ignores seeds: both samples are the same answer, "unchanged"
    summary = run(prompts_file(tmp_path), str(out), options(ScriptedBackend(), filter=True))
    assert summary.dropped == len(PROMPTS) and summary.kept == 0 and summary.complete
    assert summary.curation["reasons"] == {"unchanged": len(PROMPTS)}
    assert {d["filter"]["reasons"][0] for d in read_jsonl(f"{out}.filtered.jsonl")} == {"unchanged"}
    assert run(prompts_file(tmp_path), str(out), options(ScriptedBackend(), filter=True)).nothing_to_do
    kept = run(prompts_file(tmp_path), None, options(SampledBackend(), filter=True))
    assert kept.kept + kept.dropped == len(PROMPTS) and kept.kept


def test_judge_with_a_separate_judge_model_labels_critique_pairs(tmp_path):
    judge = SampledBackend(model_name="judge-model")
    summary = run(PROMPTS[:3], None, GenerateOptions(model=ScriptedBackend(model_name="policy-model"), filter=False,
                                                      judge=True, judge_model=judge))
    assert judge.scored and summary.kept == 3
    assert all(r["judge"]["model"] == "judge-model" and r["meta"]["model"] == "policy-model" for r in summary.records)


def test_the_review_index_reads_sampled_pairs_and_their_margin_drops(tmp_path):
    from cai.review.index import PairsIndex

    out = tmp_path / "out.jsonl"
    run(prompts_file(tmp_path), str(out), options(SampledBackend(bias=0.0), samples=4, min_margin=0.35))
    index = PairsIndex(str(out)).build(background=False)
    try:
        index.wait()
        assert index.error is None and index.torn == 0
        kept = read_jsonl(out)
        dropped = read_jsonl(f"{out}.filtered.jsonl")
        assert kept and dropped, "the margin keeps some pairs and drops some prompts"
        assert len(index.entries) == len(kept) + len(dropped)
        for entry in index.entries:
            assert index.read(entry.n)["id"]
    finally:
        index.close()
    from cai.review.server import Review

    review = Review(str(out), lock=False)
    try:
        review.index.wait()
        for n in range(len(kept) + len(dropped)):
            view = review.pair(n)
            assert view["record"]["id"] and view["status"] in ("kept", "dropped")
        assert review.summary()
    finally:
        review.close()
