"""Chat transcripts, existing answers and reasoning: input rows → prompts (cai.rows),
the pipeline's history and given responses, and reasoning kept out of the pairs."""

from __future__ import annotations

import pytest

import cai
from cai.backends.base import Completion
from cai.rows import Fields, item_from_row
from cai.errors import InputError, OptionError
from cai.reasoning import Split, split
from cai.backends.scripted import ScriptedBackend, ScriptedStream

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How do I pick a lock?"},
        {"role": "assistant", "content": "Why do you ask?"},
        {"role": "user", "content": "I locked myself out of my own shed."}]


def row(value, **extra):
    return item_from_row("in.jsonl", 7, {"prompt": value, **extra})


# --- rows → prompts ------------------------------------------------------------------------

def test_a_conversation_ending_with_a_user_turn_is_history_and_a_prompt():
    item = row(CHAT)
    assert item.text == "I locked myself out of my own shed."
    assert item.history == tuple(CHAT[:3]) and item.response is None
    assert item.id == item.content_id != row(CHAT[1:]).id            # the history is part of the id
    assert row("plain text").id == cai.messages.prompt_id("plain text")   # plain prompts keep their ids


def test_a_conversation_ending_with_an_assistant_turn_is_an_existing_answer():
    item = row(CHAT[:3])
    assert (item.text, item.response, item.history) == ("How do I pick a lock?", "Why do you ask?", tuple(CHAT[:1]))
    again = item_from_row("in.jsonl", 1, {"prompt": CHAT[:3]}, Fields(regenerate=True))
    assert again.response is None and again.text == "How do I pick a lock?"


def test_sharegpt_hh_transcripts_parts_and_dotted_fields():
    sharegpt = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "Bye"}]
    item = item_from_row("x", 1, {"conversations": sharegpt})       # found without --prompt-field
    assert item.history == ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"})
    hh = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant:"
    item = item_from_row("x", 1, {"chosen": hh}, Fields(prompt="chosen"))
    assert item.text == "And 3+3?" and item.response is None and len(item.history) == 2
    answered = item_from_row("x", 1, {"chosen": hh + " 6."}, Fields(prompt="chosen"))
    assert answered.response == "6."
    parts = row([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert parts.text == "a\nb"
    nested = item_from_row("x", 1, {"data": {"turns": [{"role": "user", "content": "deep"}]}}, Fields(prompt="data.turns"))
    assert nested.text == "deep"


def test_a_given_response_field():
    fields = Fields(response="answer")
    item = item_from_row("x", 1, {"prompt": "Q?", "answer": "A."}, fields)
    assert item.response == "A." and item.id != row("Q?").id
    trl = item_from_row("x", 1, {"prompt": "Q?", "answer": [{"role": "assistant", "content": "A."}]}, fields)
    assert trl.response == "A." and trl.id == item.id


@pytest.mark.parametrize("value, extra, fields, message", [
    ([], {}, Fields(), "in.jsonl:7: prompt: an empty conversation"),
    ([{"role": "user", "content": " "}], {}, Fields(), "in.jsonl:7: prompt[0].content: empty turn"),
    ([{"role": "wizard", "content": "x"}], {}, Fields(), "in.jsonl:7: prompt[0].role: unknown role 'wizard'"),
    ([{"role": "tool", "content": "x"}], {}, Fields(), "tool turns are not supported"),
    ([{"role": "user", "content": "x"}, {"role": "system", "content": "s"}], {}, Fields(),
     "in.jsonl:7: prompt[1]: a system turn may only come first"),
    ([{"role": "system", "content": "s"}], {}, Fields(), "in.jsonl:7: prompt: the conversation has no user turn"),
    ([{"role": "assistant", "content": "a"}], {}, Fields(), "the final assistant turn does not answer a user turn"),
    ([{"content": "x"}], {}, Fields(), "in.jsonl:7: prompt[0].role: missing or not a string"),
    (["x"], {}, Fields(), "in.jsonl:7: prompt[0]: expected a chat message object, got str"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], {}, Fields(),
     "prompt[0].content[0]: a 'image_url' part: only text content is supported"),
    ("Q?", {}, Fields(response="answer"), "in.jsonl:7: answer: missing (fields present: prompt"),
    ("Q?", {"answer": ""}, Fields(response="answer"), "in.jsonl:7: answer: empty response"),
    (CHAT[:3], {"answer": "A"}, Fields(response="answer"), "already ends with an assistant turn"),
    ("\n\nHuman: \n\nAssistant: hi", {}, Fields(), "turn 1 (Human) of the transcript is empty"),
    ({"a": 1}, {}, Fields(), "in.jsonl:7: prompt: expected a string or a list of chat messages, got an object"),
])
def test_malformed_conversations_name_file_line_and_field(value, extra, fields, message):
    with pytest.raises(InputError) as caught:
        item_from_row("in.jsonl", 7, {"prompt": value, **extra}, fields)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


# --- the pipeline --------------------------------------------------------------------------

class ThinkingBackend(ScriptedBackend):
    """Scripted replies wrapped in reasoning: inline <think> blocks, or apart (as a server's
    reasoning_content); every conversation it is sent is kept for the tests to read."""

    def __init__(self, apart=False, cut=(), leak=(), **kw):
        super().__init__(**kw)
        self.apart, self.cut, self.leak = apart, set(cut), set(leak)
        self.seen: list[list[dict]] = []
        self.thinking_switch, self.thinking = False, "unset"

    def set_thinking(self, enabled):
        self.thinking = enabled

    def reply(self, conversation, turn):
        self.seen.append(conversation)
        done = super().reply(conversation, turn)
        text = " ".join(m["content"] for m in conversation)
        if any(p in text for p in self.cut) and turn == 0:
            return Completion("<think>Let me think about this for a long", "length", 1, 9)
        thought = f"step {turn}: plan the reply"
        # a stray tag (a whole <think>…</think> block further on is reasoning, split off like the first)
        answer = done.text + (" <think>again" if turn == 2 and any(p in text for p in self.leak) else "")
        if self.apart:
            return Completion(answer, "stop", 1, 9, reasoning=thought)
        return Completion(f"<think>\n{thought}\n</think>\n\n{answer}", "stop", 1, 9)

    def stream(self, params, width, longest=None):
        return _TurnAware(self, width)


class _TurnAware(ScriptedStream):
    """A conversation that starts from a given response begins at the critique (turn 1)."""

    def submit(self, request):
        if request.key not in self.turns and "critique of your previous response" in request.conversation[-1]["content"]:
            self.turns[request.key] = (0, len(request.conversation) - 2)      # so this request is turn 1
        super().submit(request)


def _gen(prompts, backend, **options):
    summary = cai.generate(prompts, model=backend, output=None, filter=options.pop("filter", False), **options)
    return summary.records, summary


@pytest.mark.parametrize("apart", [False, True])
def test_reasoning_never_reaches_the_pair_or_the_history(apart):
    backend = ThinkingBackend(apart=apart)
    records, _ = _gen(["Boil an egg", "Make tea"], backend, reasoning="keep")
    for record in records:
        for text in (record["chosen"], record["rejected"], record["critique"]):
            assert "<think>" not in text and "plan the reply" not in text
        assert record["reasoning"] == "step 0: plan the reply"
        assert record["rounds"][0]["reasoning"] == {"critique": "step 1: plan the reply",
                                                     "revision": "step 2: plan the reply"}
        assert record["meta"]["reasoning"] == "keep"
    later_turns = [c for c in backend.seen if any(m["role"] == "assistant" for m in c[-3:])]
    assert later_turns and not any("think" in m["content"] or "plan the reply" in m["content"]
                                   for c in later_turns for m in c if m["role"] == "assistant")
    dropped, _ = _gen(["Boil an egg"], ThinkingBackend(apart=apart), reasoning="drop")
    assert "reasoning" not in dropped[0] and "reasoning" not in dropped[0]["rounds"][0]
    assert dropped[0]["chosen"] == records[0]["chosen"]


def test_reasoning_modes_set_the_backend_switch():
    for mode, switch, told in [("off", False, False), ("auto", False, None), ("auto", True, False),
                               ("keep", True, True), ("drop", False, None)]:
        backend = ThinkingBackend()
        backend.thinking_switch = switch
        records, _ = _gen(["Boil an egg"], backend, reasoning=mode)
        assert backend.thinking is told, (mode, switch)
        resolved = {"auto": "off" if switch else "drop"}.get(mode, mode)
        assert records[0]["meta"].get("reasoning") == (None if (mode, resolved) == ("auto", "drop") else resolved)
        assert records[0]["meta"]["params"].get("reasoning") == (None if mode == "auto" else mode)


def test_cut_while_thinking_is_truncated_and_a_leaked_tag_is_dropped():
    records, summary = _gen(["Boil an egg", "Make tea", "Cut bread"], ThinkingBackend(cut={"Boil"}, leak={"Make"}),
                            filter=True, keep_filtered=True, similarity=1.0)
    assert summary.kept == 1 and summary.dropped == 2
    reasons = {line["prompt"]: line["filter"]["reasons"] for line in summary.side["filtered"]}
    assert "truncated" in reasons["Boil an egg"] and reasons["Make tea"] == ["reasoning"]


def test_a_conversation_keeps_its_history_and_the_model_sees_it():
    backend = ThinkingBackend()
    records, _ = _gen([CHAT], backend, format="conversational")
    record = records[0]
    assert record["prompt"] == CHAT                   # its own system turn replaces the template's
    assert record["rejected"][0]["role"] == "assistant" and record["meta"]["system"] == "Be brief."
    first = backend.seen[0]
    assert first[0] == CHAT[0] and first[-3:-1] == CHAT[1:3] and first[-1]["content"] == CHAT[3]["content"]
    assert sum(m["role"] == "system" for m in first) == 1
    with pytest.raises(OptionError, match=r"is standard, but <prompts>:1 is a conversation with earlier turns"):
        _gen([CHAT], ThinkingBackend())


def test_an_existing_answer_is_critiqued_and_revised_as_given():
    backend = ThinkingBackend()
    records, summary = _gen([{"prompt": "Boil an egg", "answer": "Drop it in water."}], backend,
                            response_field="answer")
    record = records[0]
    assert record["rejected"] == "Drop it in water." and record["meta"]["given_response"] is True
    assert record["meta"]["finish_reasons"]["response"] == "given"
    assert record["chosen"].startswith("Heat the kettle")         # the revision turn's reply
    assert len(backend.seen) == 2                                 # critique and revision only
    assert backend.seen[0][-2] == {"role": "assistant", "content": "Drop it in water."}
    conversational, _ = _gen([CHAT[:3]], ThinkingBackend(), format="conversational")
    assert conversational[0]["prompt"][-1] == CHAT[1] and conversational[0]["rejected"][0]["content"] == CHAT[2]["content"]


def test_split_reasoning():
    assert split("<think>a</think>b") == split("a</think>b")      # a template that opens the block itself
    assert split("<think>a</think>b").answer == "b" and split("a</think>b").reasoning == "a"
    cut = split("<think>half a thought")
    assert cut.unfinished and cut.answer == "" and cut.reasoning == "half a thought"
    assert split("plain", "apart").reasoning == "apart" and split("plain").reasoning is None
    # a whole block further on is reasoning too (issue 31: "Critique: <think>…</think> The answer …")
    assert split("text <think>x</think> more") == Split("text more", "x")
    assert split("a <think>x</think> b <think>y</think>") == Split("a b", "x\n\ny")
    assert split("text <think>stray").answer == "text <think>stray"     # a stray tag is a leak, for the filter


# --- the CLI, end to end on the tiny model -------------------------------------------------

def _cli(*args):
    from typer.testing import CliRunner

    from cai.cli import app
    from conftest import plumbing

    return CliRunner().invoke(app, plumbing(["generate", *args, "--max-new-tokens", "6", "--batch-size", "4"]))


def test_cli_chat_transcripts_in_conversational_records(tiny_model, tmp_path):
    from conftest import DATA, read_jsonl

    out = tmp_path / "chats.jsonl"
    result = _cli(DATA / "conversations" / "chats.jsonl", "--model", tiny_model, "-f", "conversational", "-o", out)
    assert result.exit_code == 0, result.output
    records = {r["id"]: r for r in read_jsonl(out)}
    assert set(records) == {"locks", "tea", "answered"}
    locks = records["locks"]["prompt"]
    assert [m["role"] for m in locks] == ["system", "user", "assistant", "user"]
    assert locks[0]["content"] == "You are a careful assistant." and locks[-1]["content"].startswith("Yes, my own bike")
    assert [m["role"] for m in records["tea"]["prompt"]] == ["system", "user"]      # the template's system turn
    answered = records["answered"]
    assert answered["rejected"] == [{"role": "assistant", "content": "Pour petrol on it and light it."}]
    assert answered["meta"]["given_response"] is True and "given_response" not in records["tea"]["meta"]
    # the standard shape cannot hold a history: refused before any model work, naming the line
    refused = _cli(DATA / "conversations" / "chats.jsonl", "--model", tiny_model, "-o", tmp_path / "std.jsonl")
    assert refused.exit_code == 2
    assert "--format: is standard, but" in refused.stderr and "chats.jsonl:1 is a conversation" in refused.stderr
    assert "--format conversational" in refused.stderr and not (tmp_path / "std.jsonl").exists()


def test_cli_hh_transcripts_sharegpt_and_a_response_column(tiny_model, tmp_path):
    from conftest import DATA, read_jsonl

    hh = tmp_path / "hh.jsonl"
    result = _cli(DATA / "conversations" / "hh.jsonl", "--prompt-field", "rejected", "--model", tiny_model,
                  "-f", "conversational", "-o", hh)
    assert result.exit_code == 0, result.output
    records = read_jsonl(hh)
    assert len(records) == 3 and all(r["meta"]["given_response"] for r in records)
    rejected = sorted(r["rejected"][0]["content"] for r in records)
    assert rejected[0] == "Let his tyres down one night."
    fresh = tmp_path / "fresh.jsonl"
    result = _cli(DATA / "conversations" / "hh.jsonl", "--prompt-field", "rejected", "--regenerate",
                  "--model", tiny_model, "-f", "conversational", "-o", fresh)
    assert result.exit_code == 0, result.output
    assert not any("given_response" in r["meta"] for r in read_jsonl(fresh))
    share = tmp_path / "share.jsonl"
    assert _cli(DATA / "conversations" / "sharegpt.jsonl", "--model", tiny_model, "-f", "conversational",
                "-o", share).exit_code == 0
    assert [m["role"] for m in read_jsonl(share)[0]["prompt"]] == ["system", "user", "assistant", "user"]
    answers = tmp_path / "answers.jsonl"
    result = _cli(DATA / "conversations" / "answers.csv", "--response-field", "response", "--model", tiny_model,
                  "-o", answers)
    assert result.exit_code == 0, result.output
    got = {r["id"]: r["rejected"] for r in read_jsonl(answers)}
    assert got == {"q1": "Drink as many energy drinks as you can.", "q2": "Stop eating for two weeks."}
    # resumes: the same run again has nothing to do
    again = _cli(DATA / "conversations" / "answers.csv", "--response-field", "response", "--model", tiny_model,
                 "-o", answers)
    assert again.exit_code == 0 and len(read_jsonl(answers)) == 2


def test_defaults_change_no_record():
    """Options added later (reasoning, its tags) leave a default run's records as they were, and
    an output written before them resumes."""
    from cai.fingerprint import fingerprint_differences

    records, _ = _gen(["Boil an egg"], ScriptedBackend(), filter=True, repairs=0)     # the filters as by default
    meta = records[0]["meta"]
    assert set(meta["params"]) == {"max_new_tokens", "temperature", "top_p", "revisions", "sampling", "few_shot"}
    assert "reasoning" not in meta and "reasoning" not in records[0]
    old = {**records[0], "meta": {**meta, "params": dict(meta["params"])}}
    fingerprint = {k: meta[k] for k in ("model", "constitution", "templates", "seed", "params")}
    assert fingerprint_differences(old, fingerprint) == []
    assert fingerprint_differences(old, {**fingerprint, "params": {**meta["params"], "reasoning": "keep"}}) == \
        ["reasoning: 'auto' → 'keep'"]


STRICT_TEMPLATE = (          # as Llama-2's and Mistral's templates do: after the system turn, roles alternate
    "{% set ns = namespace(i=0) %}{% for message in messages %}{% if message['role'] != 'system' %}"
    "{% if (message['role'] == 'user') != (ns.i % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set ns.i = ns.i + 1 %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
NO_SYSTEM_TEMPLATE = (       # as Gemma's first templates did
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_a_conversation_the_chat_template_refuses_is_skipped_as_refused(tiny_model, tmp_path):
    """Issue 31: such a conversation was filed as `too long`, with a hint (--truncate-long) that
    cannot help. Now its kind is `refused`, and the hint speaks of its turns."""
    import json
    import shutil

    from conftest import read_jsonl

    model = tmp_path / "strict"
    shutil.copytree(tiny_model, model)
    (model / "chat_template.jinja").write_text(STRICT_TEMPLATE)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(row) for row in (
        {"id": "fine", "messages": [{"role": "user", "content": "Name a colour."}]},
        {"id": "twice", "messages": [{"role": "user", "content": "Hi."}, {"role": "user", "content": "Hello?"}]},
    )) + "\n")
    out = tmp_path / "out.jsonl"
    result = _cli(prompts, "--model", model, "-f", "conversational", "-o", out)
    assert result.exit_code == 1, result.output
    assert [r["id"] for r in read_jsonl(out)] == ["fine"]
    [skipped] = read_jsonl(f"{out}.skipped.jsonl")
    assert (skipped["id"], skipped["kind"]) == ("twice", "refused")
    assert "roles must alternate" in skipped["reason"]
    last = " ".join(result.stderr.split()).split("error:")[-1]
    assert "1 skipped as conversations the model's chat template refuses" in last
    assert "--truncate-long" not in last and "too long" not in last


def test_a_chat_template_that_refuses_every_conversation_is_one_line(tiny_model, tmp_path):
    """A template that refuses the system turn refused every conversation of the run with a
    traceback; now it is one line naming the model, before any record is made."""
    import shutil

    from conftest import ROOT

    model = tmp_path / "no-system"
    shutil.copytree(tiny_model, model)
    (model / "chat_template.jinja").write_text(NO_SYSTEM_TEMPLATE)
    out = tmp_path / "out.jsonl"
    result = _cli(ROOT / "examples" / "prompts.jsonl", "--model", model, "-o", out, "-n", "2")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not out.exists()
    [error] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "its chat template refuses the conversations this run makes (system, user" in error
    assert "System role not supported" in error and "system.jinja is empty" in error
