"""cai.pipeline over a scripted backend (no model): the generate → critique → revise turns each
conversation goes through, what each record holds, the prompts left out (Unfit) before they
start, failed turns, repairs and the reasoning split. Each test is a specification, in
milliseconds."""

from __future__ import annotations

import pytest

from cai.backends.base import Completion, Request, SamplingParams
from cai.constitution import load_constitution
from cai.errors import BackendError, OptionError
from cai.messages import PromptItem
from cai.pipeline import REFUSED, TOO_LONG, Pipeline, RunConfig
from cai.templates import load_templates
from cai.backends.scripted import ScriptedBackend, ScriptedStream

CONSTITUTION = load_constitution("minimal")
TEMPLATES = load_templates("default")
GREEDY = SamplingParams(max_new_tokens=16, temperature=0)


class Recording(ScriptedStream):
    """The scripted stream, keeping every request as it was submitted (with its turn number)."""

    def submit(self, request: Request) -> None:
        super().submit(request)
        self.backend.requests.append((request, self.waiting[-1][1]))


class Backend(ScriptedBackend):
    """ScriptedBackend that keeps the requests it was sent and answers from `script` first: a
    callable (request conversation, turn, nth call of that turn) → Completion or None."""

    def __init__(self, script=None, **kwargs):
        super().__init__(**kwargs)
        self.script = script
        self.requests: list[tuple[Request, int]] = []
        self.seen: dict[int, int] = {}

    def stream(self, params, width, longest=None, **kwargs):
        self.widths = (params, width, longest)
        return Recording(self, width)

    def reply(self, conversation, turn):
        nth = self.seen[turn] = self.seen.get(turn, 0) + 1
        made = self.script(conversation, turn, nth) if self.script else None
        return made if made is not None else super().reply(conversation, turn)


def item(text="How do I boil water?", n=0, **kwargs) -> PromptItem:
    return PromptItem(id=f"p{n}", text=text, line=n + 1, index=n, **kwargs)


def pipeline(backend, **config) -> Pipeline:
    return Pipeline(backend, CONSTITUTION, TEMPLATES, RunConfig(**{"params": GREEDY, "few_shot": False, **config}))


def make(backend, items, check=None, **config) -> list[dict]:
    p = pipeline(backend, **config)
    jobs, left_out = p.plan(items)
    assert left_out == []
    return [record for batch in p.run(jobs, check=check) for record in batch]


def test_each_conversation_goes_response_critique_revision_and_grows_by_its_own_turns():
    backend = Backend()
    [record] = make(backend, [item()], revisions=2)
    sent = [request.conversation for request, _ in backend.requests]
    assert [turn for _, turn in backend.requests] == [0, 1, 2, 3, 4]
    assert [len(c) for c in sent] == [2, 4, 6, 8, 10]            # system + prompt, then two more a turn
    assert sent[0] == [{"role": "system", "content": "You are a helpful, honest and harmless AI assistant."},
                       {"role": "user", "content": "How do I boil water?"}]
    for before, after in zip(sent, sent[1:]):
        assert after[:len(before)] == before                        # each turn extends the conversation
        assert after[len(before)]["role"] == "assistant"
    principles = [CONSTITUTION.principle(pid) for pid in (r["principle"] for r in record["rounds"])]
    for round_no, principle in enumerate(principles):
        critique_request, revision_request = sent[1 + 2 * round_no][-1], sent[2 + 2 * round_no][-1]
        assert critique_request["role"] == revision_request["role"] == "user"
        assert principle.critique in critique_request["content"]
        assert principle.revision in revision_request["content"] and "How do I boil water?" in revision_request["content"]
    # the answers the model gave are the assistant turns the next request carries
    replies = [c[i]["content"] for c, i in zip(sent[1:], (2, 4, 6, 8))]
    assert replies[0] == record["rejected"]
    assert [replies[1], replies[2]] == [record["rounds"][0]["critique"], record["rounds"][0]["revision"]]
    assert replies[3] == record["rounds"][1]["critique"] == record["critique"]


def test_a_record_holds_the_pair_its_rounds_and_the_run_that_made_it():
    backend = Backend()
    [record] = make(backend, [item()], revisions=2, seed=7)
    assert list(record) == ["id", "prompt", "chosen", "rejected", "principle", "critique", "rounds", "meta"]
    assert record["id"] == "p0" and record["prompt"] == "How do I boil water?"
    assert record["rejected"].startswith("Sure. Step one")
    assert record["chosen"] == record["rounds"][-1]["revision"] and record["chosen"].startswith("Heat the kettle")
    assert record["principle"] == record["rounds"][-1]["principle"]
    assert [set(r) for r in record["rounds"]] == [{"principle", "critique", "revision"}] * 2
    meta = record["meta"]
    assert meta["model"] == "scripted" and meta["seed"] == 7
    assert meta["constitution"] == CONSTITUTION.ref and meta["templates"] == TEMPLATES.ref
    assert meta["params"]["max_new_tokens"] == 16
    assert meta["system"] == "You are a helpful, honest and harmless AI assistant."
    assert meta["finish_reasons"] == {"response": "stop", "critique": ["stop", "stop"], "revision": ["stop", "stop"]}
    prompt_tokens = sum(backend.count_tokens(r.conversation) for r, _ in backend.requests)
    assert meta["tokens"]["prompt"] == prompt_tokens and meta["tokens"]["completion"] > 0
    for absent in ("prompt_truncated", "given_response", "attempts", "repairs", "reasoning"):
        assert absent not in meta


def test_every_turn_has_its_own_seed_whatever_else_is_in_flight():
    """A turn's seed depends on the run's seed, the record and the turn: the same with one
    conversation at a time or eight, and different for each turn and record."""
    items = [item(f"Prompt number {n}", n) for n in range(6)]
    seeds, records = {}, {}
    for width in (1, 8):
        backend = Backend(width=width)
        made = make(backend, items, batch_size=width, seed=3)
        seeds[width] = {(r.key, turn): r.seed for r, turn in backend.requests}
        records[width] = {r["id"]: {**r, "meta": {k: v for k, v in r["meta"].items() if k != "created"}} for r in made}
    assert seeds[1] == seeds[8] and records[1] == records[8]
    assert len(set(seeds[1].values())) == len(seeds[1]) == 6 * 3
    other = Backend()
    make(other, items[:1], seed=4)
    assert {(r.key, t): r.seed for r, t in other.requests} != {k: v for k, v in seeds[1].items() if k[0] == "p0"}


def test_a_given_response_is_critiqued_and_revised_without_a_response_turn():
    backend = Backend()
    [record] = make(backend, [item(response="Just boil it.")])
    assert [turn for _, turn in backend.requests] == [0, 1]            # the stream's turns: critique, revision
    first = backend.requests[0][0].conversation
    assert first[-2] == {"role": "assistant", "content": "Just boil it."} and first[-1]["role"] == "user"
    assert record["rejected"] == "Just boil it."
    assert record["meta"]["given_response"] is True
    assert record["meta"]["finish_reasons"]["response"] == "given"


def test_a_conversation_keeps_its_earlier_turns_and_its_own_system_turn():
    history = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello!"})
    backend = Backend()
    [record] = make(backend, [item("And tea?", history=history)])
    first = backend.requests[0][0].conversation
    assert first == [*history, {"role": "user", "content": "And tea?"}]      # its system turn replaces the template's
    assert record["prompt"] == "And tea?" and record["history"] == list(history)
    assert record["meta"]["system"] == "Be brief."


def test_sampling_all_makes_one_record_per_principle():
    records = make(Backend(), [item()], sampling="all")
    assert sorted(r["id"] for r in records) == sorted(f"p0/{p.id}" for p in CONSTITUTION.principles)
    assert {r["id"].split("/")[1] for r in records} == {r["principle"] for r in records}


def test_prompts_too_long_for_the_context_are_left_out_or_cut_to_fit():
    long = "word " * 400
    backend = Backend(context_length=500)
    p = pipeline(backend)
    jobs, left_out = p.plan([item("short one", 0), item(long, 1)])
    assert [j.record_id for j in jobs] == ["p0"] and jobs[0].tokens <= 500
    [(skipped, record_id, why)] = left_out
    assert (skipped.id, record_id, why.kind) == ("p1", "p1", TOO_LONG)
    assert "more than the model's context of 500" in str(why)
    jobs, left_out = p.plan([item(long, 1)], truncate_long=True)
    assert left_out == [] and jobs[0].prompt.truncated and len(jobs[0].prompt.text) < len(long)
    assert jobs[0].tokens <= 500
    [record] = [r for batch in p.run(jobs) for r in batch]
    assert record["meta"]["prompt_truncated"] is True and long.startswith(record["prompt"])
    # done records are not planned again
    assert p.plan([item("short one", 0)], todo=lambda record_id: record_id != "p0") == ([], [])
    assert [j.record_id for j in p.plan([item("short one", 0)], todo=lambda record_id: record_id != "p1")[0]] == ["p0"]


def test_a_context_no_prompt_fits_is_an_error_about_max_new_tokens():
    with pytest.raises(OptionError) as caught:
        pipeline(Backend(context_length=40)).plan([item()])
    assert caught.value.option == "max_new_tokens"
    assert "need more than the model's context of 40 tokens" in str(caught.value)


def test_a_conversation_the_chat_template_refuses_is_left_out():
    class Strict(Backend):
        def count_tokens(self, conversation):
            if any(m["role"] == "assistant" and m["content"] == "odd" for m in conversation):
                raise ValueError("Conversation roles must alternate\nuser/assistant")
            return super().count_tokens(conversation)

    history = ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "odd"})
    jobs, left_out = pipeline(Strict(context_length=4000)).plan([item("ok", 0), item("Then?", 1, history=history)])
    assert [j.record_id for j in jobs] == ["p0"]
    [(_, _, why)] = left_out
    assert why.kind == REFUSED and str(why).endswith("refuses this conversation: Conversation roles must alternate user/assistant")


def test_a_failed_turn_ends_its_conversation_only():
    backend = Backend(fail={"Prompt number 1"})
    p = pipeline(backend)
    jobs, _ = p.plan([item(f"Prompt number {n}", n) for n in range(3)])
    failures = []
    records = [r for batch in p.run(jobs, on_failure=lambda job, stage, why: failures.append((job.record_id, stage, why)))
               for r in batch]
    assert sorted(r["id"] for r in records) == ["p0", "p2"]
    assert failures == [("p1", "response", "scripted failure for 'Prompt number 1'")]
    with pytest.raises(BackendError, match=r"^p1: response: scripted failure"):
        list(p.run(jobs))


def test_once_stop_is_true_no_new_conversation_starts_and_those_in_flight_finish():
    backend = Backend(width=2)
    p = pipeline(backend, batch_size=2)
    jobs, _ = p.plan([item(f"Prompt number {n}", n) for n in range(5)])
    records = [r for batch in p.run(jobs, stop=lambda: backend.calls > 0) for r in batch]
    assert sorted(r["id"] for r in records) == ["p0", "p1"]
    assert len(records[0]["rounds"]) == 1 and {r.key for r, _ in backend.requests} == {"p0", "p1"}


def test_a_pair_the_checks_would_drop_gets_its_revision_again_with_a_new_seed():
    """With repairs, a finished pair that `check` refuses takes back its last revision and asks
    again (the conversation as it was before that revision, another seed); meta says what failed."""
    def check(record):
        return ["unchanged"] if "first try" in record["chosen"] else []

    def script(conversation, turn, nth):
        if turn == 2:
            return Completion("first try" if nth == 1 else "second try, better", "stop", 5, 3)
        return None

    backend = Backend(script)
    [record] = make(backend, [item()], check=check, repairs=2)
    revisions = [(r, t) for r, t in backend.requests if t == 2]
    assert len(revisions) == 2
    (first, _), (second, _) = revisions
    assert first.conversation == second.conversation and first.seed != second.seed
    assert record["chosen"] == "second try, better"
    assert record["meta"]["repairs"] == [{"turn": "revision 1", "reasons": ["unchanged"], "tokens": 3}]
    assert record["meta"]["attempts"] == {"response": 1, "critique 1": 1, "revision 1": 2}
    assert record["meta"]["repair_temperature"] == 0.5      # a greedy run samples its repairs
    assert second.params.temperature == 0.5 and first.params is None
    assert record["meta"]["tokens"]["completion"] == sum(
        c for c in (len(record["rejected"].split()), len(record["critique"].split()), 3, 3))


def test_repairs_give_up_after_their_number_and_the_record_still_comes_out():
    backend = Backend()
    [record] = make(backend, [item()], check=lambda r: ["unchanged"], repairs=2, repair_from="critique")
    assert [t for _, t in backend.requests] == [0, 1, 2, 1, 2, 1, 2]      # critique and revision, twice more
    assert [r["turn"] for r in record["meta"]["repairs"]] == ["revision 1", "revision 1"]
    assert record["meta"]["attempts"] == {"response": 1, "critique 1": 3, "revision 1": 3}


def test_a_response_cut_at_max_new_tokens_is_sampled_again_before_its_critique():
    def script(conversation, turn, nth):
        return Completion("cut off mid", "length", 5, 16) if turn == 0 and nth == 1 else None

    backend = Backend(script)
    [record] = make(backend, [item()], check=lambda r: [], repairs=1)
    assert [t for _, t in backend.requests] == [0, 0, 1, 2]
    assert record["meta"]["repairs"] == [{"turn": "response", "reasons": ["truncated"], "tokens": 16}]
    assert record["rejected"] != "cut off mid" and record["meta"]["finish_reasons"]["response"] == "stop"


def test_without_repairs_check_is_not_asked():
    asked = []
    make(Backend(), [item()], check=lambda r: asked.append(r) or ["unchanged"])
    assert asked == []


def _thinking(conversation, turn, nth):
    texts = ["<think>plan the answer</think>Boil it.", "<think>is it safe?</think>Mention burns.",
             "<think>add a warning</think>Boil it; mind the steam."]
    return Completion(texts[turn], "stop", 5, 5)


def test_reasoning_is_split_from_each_turn_and_never_carried_on_or_kept_by_default():
    backend = Backend(_thinking)
    [record] = make(backend, [item()])
    assert (record["rejected"], record["critique"], record["chosen"]) == ("Boil it.", "Mention burns.", "Boil it; mind the steam.")
    assert not any("<think>" in m["content"] or "plan the answer" in m["content"]
                   for r, _ in backend.requests for m in r.conversation)
    assert "reasoning" not in record and "reasoning" not in record["rounds"][0] and "reasoning" not in record["meta"]


def test_reasoning_keep_puts_each_turns_reasoning_in_the_record():
    [record] = make(Backend(_thinking), [item()], reasoning="keep")
    assert record["reasoning"] == "plan the answer"
    assert record["rounds"][0]["reasoning"] == {"critique": "is it safe?", "revision": "add a warning"}
    assert record["meta"]["reasoning"] == "keep"
    assert record["chosen"] == "Boil it; mind the steam."


def test_a_turn_that_ends_while_still_thinking_counts_as_cut():
    def script(conversation, turn, nth):
        return Completion("<think>still going", "stop", 5, 5) if turn == 0 else None

    [record] = make(Backend(script), [item()])
    assert record["rejected"] == "" and record["meta"]["finish_reasons"]["response"] == "length"
