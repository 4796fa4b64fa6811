"""The wire format of OpenAI-compatible servers (cai.backends.openai_wire): URLs, bodies, and the
reading of replies. No server."""

from __future__ import annotations

import pytest

from cai.backends import openai_wire as wire
from cai.backends.base import SamplingParams
from cai.errors import UsageError


def reply(message=None, **choice) -> dict:
    body = {"index": 0, "finish_reason": "stop", **choice}
    if message is not None:
        body["message"] = message
    return {"choices": [body], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}


def test_urls():
    assert wire.endpoint("http://127.0.0.1:8000/v1/").root == "http://127.0.0.1:8000/v1"
    assert wire.endpoint("http://127.0.0.1:8000").root == "http://127.0.0.1:8000/v1"
    assert wire.endpoint("https://h/api/v1/chat/completions").root == "https://h/api/v1"
    assert wire.chat_url("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000/v1/chat/completions"
    assert wire.chat_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert wire.chat_url("https://h/api/v1/chat/completions") == "https://h/api/v1/chat/completions"
    assert wire.endpoint("https://h/api/v1/chat/completions").url("/models") == "https://h/api/v1/models"
    for bad in ("127.0.0.1:8000", "ftp://h/v1", "http://"):
        with pytest.raises(UsageError, match="base URL"):
            wire.chat_url(bad)


def test_choice_tokens():
    for token in ("A", " A", "(A", " (A", "( A", "\nA", "A "):
        assert wire.choice_of(token, ("A", "B")) == "A", token
    for token in ("AB", "a", "(", "", " ", "((A", "A)", "C"):
        assert wire.choice_of(token, ("A", "B")) is None, token


def test_a_reply_with_text():
    completion = wire.parse_completion(reply({"role": "assistant", "content": "  Hi there.\n"}, finish_reason="length"))
    assert (completion.text, completion.finish_reason, completion.prompt_tokens, completion.completion_tokens) == \
        ("Hi there.", "length", 7, 3)
    assert completion.error is None
    # content as a list of parts, as some servers send it
    parts = [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there."}]
    assert wire.parse_completion(reply({"role": "assistant", "content": parts})).text == "Hi there."
    # an empty string is text the model chose to end at once: a completion, not a failure
    assert wire.parse_completion(reply({"role": "assistant", "content": ""})).text == ""


@pytest.mark.parametrize("data, reason", [
    ({"choices": []}, "the reply has no choices"),
    ({"object": "chat.completion"}, "the reply has no choices"),
    ({"choices": [{"index": 0, "finish_reason": "stop"}]}, "the reply has no message"),
    (reply({"role": "assistant", "content": None}), "the reply has no text (content is null)"),
    (reply({"role": "assistant"}), "the reply has no text (content is null)"),
    (reply({"role": "assistant", "content": []}), "the reply has no text (content is list)"),
])
def test_a_reply_without_text_raises_no_text(data, reason):
    with pytest.raises(wire.NoText) as caught:
        wire.parse_completion(data)
    assert str(caught.value) == reason


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_apart_from_the_content(field):
    completion = wire.parse_completion(reply({"role": "assistant", "content": "\n\nIt is 4.", field: " 2+2 is 4. "}))
    assert (completion.text, completion.reasoning, completion.finish_reason) == ("It is 4.", "2+2 is 4.", "stop")
    # cut by max_tokens while still thinking: a completion with no text, not a failure
    for content in (None, ""):
        cut = wire.parse_completion(reply({"role": "assistant", "content": content, field: "Let me think..."},
                                          finish_reason="length"))
        assert (cut.text, cut.reasoning, cut.finish_reason, cut.error) == ("", "Let me think...", "length", None)
    # an empty or non-string reasoning field is no reasoning; the other name is read instead
    both = reply({"role": "assistant", "content": "A", "reasoning_content": "", "reasoning": "R"})
    assert wire.parse_completion(both).reasoning == "R"
    assert wire.parse_completion(reply({"role": "assistant", "content": "A", field: ["x"]})).reasoning is None
    with pytest.raises(wire.NoText):
        wire.parse_completion(reply({"role": "assistant", "content": None, field: "  "}))


def test_inline_think_tags_stay_in_the_text():
    completion = wire.parse_completion(reply({"role": "assistant", "content": "<think>hm</think>\n\nYes."}))
    assert (completion.text, completion.reasoning) == ("<think>hm</think>\n\nYes.", None)


def test_an_event_stream_is_put_back_together():
    import json

    def events(*chunks):
        return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"

    def delta(finish=None, **d):
        return {"choices": [{"index": 0, "delta": d, "finish_reason": finish}]}

    text = events(delta(role="assistant", content=""), delta(reasoning_content="Two "), delta(reasoning="plus"),
                  delta(content="Fo"), delta(content="ur."), delta("length"),
                  {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 4}})
    completion = wire.parse_completion(wire.assemble_stream(": keep-alive\n" + text))
    assert (completion.text, completion.reasoning, completion.finish_reason) == ("Four.", "Two plus", "length")
    assert (completion.prompt_tokens, completion.completion_tokens) == (5, 4)
    assert wire.assemble_stream(events())["choices"] == []
    with pytest.raises(wire.NoText, match="the stream ended in an error: overloaded"):
        wire.assemble_stream(events(delta(content="x"), {"error": {"message": "overloaded"}}))
    assert wire.is_event_stream({"content-type": "text/event-stream; charset=utf-8"})
    assert not wire.is_event_stream({"content-type": "application/json"})


def test_bodies():
    conv = [{"role": "user", "content": "Hi"}]
    assert wire.chat_body("m", conv, SamplingParams(max_new_tokens=8, temperature=0), None) == \
        {"model": "m", "messages": conv, "max_tokens": 8, "temperature": 0}
    sampled = wire.chat_body("m", conv, SamplingParams(max_new_tokens=8, temperature=0.8, top_p=0.9), 7)
    assert sampled["top_p"] == 0.9 and sampled["seed"] == 7
    assert wire.probe_body("m") == {"model": "m", "messages": conv, "max_tokens": 1, "temperature": 0}
    assert "chat_template_kwargs" not in wire.chat_body("m", conv, SamplingParams(), None, None)
    assert wire.chat_body("m", conv, SamplingParams(), None, False)["chat_template_kwargs"] == {"enable_thinking": False}
    assert wire.scoring_body("m", conv, "(", True)["chat_template_kwargs"] == {"enable_thinking": True}


def test_model_listings_and_unknown_model_errors():
    assert wire.listed_models({"object": "list", "data": [{"id": "a"}, {"id": "b"}, {"x": 1}]}) == ["a", "b"]
    assert wire.listed_models({"data": []}) == []
    assert wire.listed_models({"models": ["a"]}) is None and wire.listed_models(["a"]) is None
    for detail in ("The model `x` does not exist.", "model 'x' not found, try pulling it first",
                   "Server is pinned to '/m'; requested 'x'.", "Unknown model: x"):
        assert wire.says_unknown_model(detail), detail
    assert not wire.says_unknown_model("max_tokens must be at least 1")


def test_error_details():
    class Response:
        def __init__(self, body, text=""):
            self._body, self.text = body, text

        def json(self):
            if self._body is None:
                raise ValueError("not json")
            return self._body

    assert wire.error_detail(Response({"error": {"message": "no  such\nmodel"}})) == "no such model"
    assert wire.error_detail(Response({"detail": "Unexpected fields"})) == "Unexpected fields"
    assert wire.error_detail(Response(None, "<html>Bad Gateway</html>")) == "<html>Bad Gateway</html>"
    assert len(wire.error_detail(Response(None, "x" * 1000))) == 200


def test_lone_surrogates_in_a_reply_become_replacement_characters():
    """Found trying issue 31's hostile servers: a reply holding `\\ud800` (valid JSON, no valid
    UTF-8) made the conversation's next request fail to encode, so every prompt failed."""
    import json

    data = json.loads('{"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", '
                      '"content": "Sure \\ud800 thing \\udfff \\ud83d\\ude00", "reasoning_content": "hm \\udc00"}}]}')
    completion = wire.parse_completion(data)
    assert completion.text == "Sure \ufffd thing \ufffd \U0001F600" and completion.reasoning == "hm \ufffd"
    completion.text.encode("utf-8")


def test_a_server_that_sends_lone_surrogates_still_makes_every_record(tmp_path):
    from typer.testing import CliRunner

    from cai.cli import app
    from conftest import ROOT, read_jsonl
    from fault_proxy import FakeOpenAI, chat_reply

    def respond(body, n):
        return 200, chat_reply("Sure \ud800 thing" if n % 2 == 0 else "Better \udfff answer, with care.")

    out = tmp_path / "s.jsonl"
    with FakeOpenAI(respond, models=["fake"]) as url:
        result = CliRunner().invoke(app, ["generate", str(ROOT / "examples" / "prompts.jsonl"), "--backend", "openai",
                                          "--base-url", url, "--model", "fake", "-o", str(out), "-n", "2", "--no-filter"])
    assert result.exit_code == 0, result.output
    assert len(read_jsonl(out)) == 2 and "\ufffd" in out.read_text(encoding="utf-8")
