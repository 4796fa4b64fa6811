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
    assert wire.api_root("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000/v1"
    assert wire.api_root("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert wire.api_root("https://h/api/v1/chat/completions") == "https://h/api/v1"
    assert wire.chat_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert wire.chat_url("https://h/api/v1/chat/completions") == "https://h/api/v1/chat/completions"
    assert wire.models_url("https://h/api/v1/chat/completions") == "https://h/api/v1/models"
    for bad in ("127.0.0.1:8000", "ftp://h/v1", "http://"):
        with pytest.raises(UsageError, match="base URL"):
            wire.chat_url(bad)


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


def test_a_reasoning_reply_without_content_says_where_its_text_went():
    data = reply({"role": "assistant", "content": None, "reasoning_content": "Let me think..."},
                 finish_reason="length")
    with pytest.raises(wire.NoText) as caught:
        wire.parse_completion(data)
    message = str(caught.value)
    assert message.startswith("the reply has no text (content is null); it has only reasoning_content")
    assert "--max-new-tokens" in message and "\n" not in message


def test_bodies():
    conv = [{"role": "user", "content": "Hi"}]
    assert wire.chat_body("m", conv, SamplingParams(max_new_tokens=8, temperature=0), None) == \
        {"model": "m", "messages": conv, "max_tokens": 8, "temperature": 0}
    sampled = wire.chat_body("m", conv, SamplingParams(max_new_tokens=8, temperature=0.8, top_p=0.9), 7)
    assert sampled["top_p"] == 0.9 and sampled["seed"] == 7
    assert wire.probe_body("m") == {"model": "m", "messages": conv, "max_tokens": 1, "temperature": 0}


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
