"""Reasoning models, backend side: the thinking switch of chat templates (HF backend on the tiny
models, OpenAI backend through chat_template_kwargs) and reasoning a server returns apart from
the answer (Completion.reasoning), whole or streamed, against a loopback fake server."""

from __future__ import annotations

import pytest

from cai.backends.base import Request, SamplingParams
from cai.backends.hf import HFBackend, HFOptions, has_thinking_switch

GREEDY = SamplingParams(max_new_tokens=6, temperature=0)
QUESTION = [{"role": "user", "content": "Hello there, how are you today?"}]
OPEN = "<|im_start|>assistant\n"
EMPTY_THINK = "<think>\n\n</think>\n\n"


# ---- the HF backend ----

@pytest.fixture(scope="module")
def thinking(thinking_model):
    backend = HFBackend(str(thinking_model), "thinking", HFOptions(device="cpu"))
    yield backend
    backend.close()


@pytest.fixture
def switched(thinking):
    """The thinking backend, put back to the template's default afterwards."""
    yield thinking
    thinking.set_thinking(None)


def test_the_switch_is_read_from_the_template(thinking, tiny_model):
    assert thinking.thinking_switch is True
    plain = HFBackend(str(tiny_model), "tiny", HFOptions(device="cpu"))
    assert plain.thinking_switch is False
    before = plain.render(QUESTION)
    plain.set_thinking(False)                  # no switch: nothing to pass, nothing changes
    assert plain.render(QUESTION) == before
    assert has_thinking_switch({"default": "x", "tool_use": "{% if enable_thinking %}{% endif %}"})
    assert not has_thinking_switch(None) and not has_thinking_switch("{{ messages }}")


def test_set_thinking_false_opens_the_reply_with_an_empty_think_block(switched):
    assert switched.render(QUESTION).endswith(OPEN)                     # the template's default: thinking
    switched.set_thinking(False)
    assert switched.render(QUESTION).endswith(OPEN + EMPTY_THINK)
    off = switched.count_tokens(QUESTION)
    assert switched.encode(QUESTION) == switched.tokenizer(switched.render(QUESTION), add_special_tokens=False)["input_ids"]
    for value in (True, None):
        switched.set_thinking(value)
        assert switched.render(QUESTION).endswith(OPEN)
        assert switched.count_tokens(QUESTION) < off


def test_the_template_drops_past_think_blocks_and_think_tags_are_plain_text(thinking):
    conversation = [*QUESTION, {"role": "assistant", "content": "<think>\nhm\n</think>\n\nFine."},
                    {"role": "user", "content": "Good."}]
    rendered = thinking.render(conversation)
    assert "hm" not in rendered and "<|im_start|>assistant\nFine.<|im_end|>" in rendered
    tokenizer = thinking.tokenizer
    assert "<think>" not in tokenizer.all_special_tokens and "</think>" not in tokenizer.all_special_tokens
    text = "<think>\nthe fox\n</think>\n\nthe dog"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"], skip_special_tokens=True) == text


def test_plain_generate_and_the_engine_render_with_the_switch(switched):
    switched.set_thinking(False)
    expected = switched.count_tokens(QUESTION)
    plain = switched.generate([QUESTION], GREEDY)[0]
    assert plain.prompt_tokens == expected and plain.reasoning is None
    stream = switched.stream(GREEDY, 2)
    assert type(stream).__name__ == "EngineStream"
    stream.submit(Request("a", QUESTION))
    (key, first), = stream.poll()
    assert key == "a" and first.prompt_tokens == expected and first.text == plain.text
    # the next turn, with a think block in the reply the template will drop: the engine reuses
    # what prefix it can and renders the rest anew
    follow = [*QUESTION, {"role": "assistant", "content": "<think>x</think>" + first.text},
              {"role": "user", "content": "And then?"}]
    stream.submit(Request("a", follow))
    (key, second), = stream.poll()
    assert second.prompt_tokens == switched.count_tokens(follow)
    assert switched.render(follow).endswith(OPEN + EMPTY_THINK)
    stream.release("a")
    scores = switched.score_choices([QUESTION], ("A", "B"))
    assert scores[0].error is None and set(scores[0].logprobs) == {"A", "B"}


def test_the_scripted_backend_has_the_interface():
    from cai.backends.scripted import ScriptedBackend

    backend = ScriptedBackend()
    assert backend.thinking_switch is False
    backend.set_thinking(False)
    assert backend.thinking is False


# ---- the OpenAI backend against a loopback server ----

httpx = pytest.importorskip("httpx")

from fault_proxy import FakeOpenAI, chat_reply, stream_reply  # noqa: E402

from cai.backends.openai import OpenAIBackend  # noqa: E402
from cai.errors import BackendError  # noqa: E402


def remote(url: str, **kwargs) -> OpenAIBackend:
    kwargs.setdefault("backoff", 0.01)
    return OpenAIBackend(url, "fake", api_key_env="CAI_TEST_NO_SUCH_KEY", timeout=10.0, **kwargs)


def one(reply, **kwargs):
    """The completion of one streamed request to a server answering `reply` to every POST, and the
    bodies the server saw."""
    fake = FakeOpenAI(lambda body, n: (200, reply), models=["fake"])
    with fake as url, remote(url, **kwargs) as backend:
        stream = backend.stream(GREEDY, 1)
        stream.submit(Request("a", QUESTION))
        (_, completion), = stream.poll()
    return completion, fake.bodies


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_apart_lands_in_completion_reasoning(field):
    completion, bodies = one(chat_reply("\n\nIt is 4.", **{field: "Two and two make four."}))
    assert (completion.text, completion.reasoning, completion.finish_reason) == \
        ("It is 4.", "Two and two make four.", "stop")
    assert completion.error is None and len(bodies) == 1


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_streamed_reasoning_is_accumulated(field):
    completion, _ = one(stream_reply(["It ", "is ", "4."], ["Two and ", "two ", "make four."], field=field))
    assert (completion.text, completion.reasoning, completion.finish_reason) == \
        ("It is 4.", "Two and two make four.", "stop")
    assert (completion.prompt_tokens, completion.completion_tokens) == (10, 6)


def test_inline_think_blocks_stay_in_the_text():
    inline = "<think>\nTwo and two.\n</think>\n\nIt is 4."
    for reply in (chat_reply(inline), stream_reply([inline[:9], inline[9:]])):
        completion, _ = one(reply)
        assert (completion.text, completion.reasoning) == (inline, None)


@pytest.mark.parametrize("reply", [
    chat_reply(None, finish_reason="length", reasoning_content="Let me think about"),
    chat_reply("", finish_reason="length", reasoning="Let me think about"),
    stream_reply([], ["Let me ", "think about"], finish_reason="length"),
], ids=["null-content", "empty-content", "streamed"])
def test_a_reply_cut_while_reasoning_comes_back_once_with_no_text(reply):
    completion, bodies = one(reply, max_retries=3)
    assert (completion.text, completion.reasoning, completion.finish_reason, completion.error) == \
        ("", "Let me think about", "length", None)
    assert len(bodies) == 1                    # not retried


def test_a_reply_that_ended_in_its_reasoning_is_a_completion_too():
    fake = FakeOpenAI(lambda body, n: (200, chat_reply(None, reasoning_content="Nothing to add.")), models=["fake"])
    with fake as url, remote(url, max_retries=3) as backend:
        completion, = backend.generate([QUESTION], GREEDY)
    assert (completion.text, completion.reasoning, completion.finish_reason) == ("", "Nothing to add.", "stop")
    assert len(fake.bodies) == 1


def test_set_thinking_sends_chat_template_kwargs():
    fake = FakeOpenAI(lambda body, n: (200, chat_reply("Fine.")), models=["fake"])
    with fake as url, remote(url) as backend:
        assert backend.thinking_switch is None              # the server's template is out of sight
        backend.generate([QUESTION], GREEDY)
        backend.set_thinking(False)
        backend.generate([QUESTION], GREEDY)
        backend.score_choices([QUESTION], ("A", "B"), prefix="(")
        backend.set_thinking(True)
        backend.generate([QUESTION], GREEDY)
        backend.set_thinking(None)
        backend.generate([QUESTION], GREEDY)
    sent = [body.get("chat_template_kwargs") for body in fake.bodies]
    assert sent == [None, {"enable_thinking": False}, {"enable_thinking": False}, {"enable_thinking": True}, None]
    assert "chat_template_kwargs" not in fake.bodies[0] and "chat_template_kwargs" not in fake.bodies[-1]


def test_a_server_that_refuses_chat_template_kwargs_is_told_apart():
    refusal = (400, {"error": {"message": "Unrecognized request argument supplied: chat_template_kwargs"}})
    fake = FakeOpenAI(lambda body, n: refusal, models=["fake"])
    with fake as url, remote(url) as backend:
        backend.set_thinking(False)
        with pytest.raises(BackendError, match="the server does not take chat_template_kwargs"):
            backend.generate([QUESTION], GREEDY)
    assert len(fake.bodies) == 1
