"""The wire format of OpenAI-compatible chat-completion servers: URLs, request bodies, and the
reading of replies (completions, logprobs, error bodies, model listings, event streams). Pure
functions: no HTTP client, no event loop.

Reasoning a server returns apart from the answer (`message.reasoning_content`, as vLLM, SGLang
and DeepSeek name it, or `message.reasoning`; `delta.…` in a stream) goes to
`Completion.reasoning`; inline `<think>` blocks in the content are left in the text."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit, urlunsplit

from cai.backends.base import ChoiceScores, Completion, SamplingParams
from cai.errors import UsageError

TOP_LOGPROBS = 20           # score_choices: alternatives asked for (OpenAI's maximum, vLLM's default cap)

# Fields score_choices sends that a server may not take; a 400/422 is explained by naming them.
SCORING_FIELDS = ("logprobs", "top_logprobs", "continue_final_message", "add_generation_prompt",
                  "chat_template_kwargs")
REASONING_FIELDS = ("reasoning_content", "reasoning")     # where servers put reasoning apart from content

_LENGTH_REASONS = {"length", "max_tokens", "model_length", "max_length"}

# How servers say they do not serve a model: vLLM and OpenAI "The model `x` does not exist",
# Ollama "model 'x' not found", `transformers serve` "Server is pinned to 'y'; requested 'x'".
_UNKNOWN_MODEL = re.compile(r"does not exist|not found|unknown model|no such model|model .*not (?:available|served)"
                            r"|is pinned to|not a valid model", re.IGNORECASE)


class NoText(ValueError):
    """A 2xx reply that carries no text: no choices, no message, or content null with no
    reasoning either. The attempt is retried like a 5xx."""


@dataclass(frozen=True)
class Endpoint:
    """Where the API is, as what the user gave splits it: `root` (scheme, host, port and path:
    what requests are made under), `query` (kept on every request: Azure-style endpoints take
    `?api-version=…`), and the user info of `http://user:password@host/…`, which is never put in
    a URL or a message: it goes as HTTP basic auth (`auth`), as httpx sends it from a URL."""

    root: str
    query: str = ""
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    def url(self, path: str = "") -> str:
        """The URL of `path` under the root (`/chat/completions`), the query kept."""
        return self.root + path + (f"?{self.query}" if self.query else "")

    def shown(self, path: str = "") -> str:
        """The URL of `path` as messages and logs show it: the user info as `***`, no query (it
        may carry a key)."""
        if self.username is None and self.password is None:
            return self.root + path
        scheme, rest = self.root.split("://", 1)
        return f"{scheme}://***@{rest}{path}"

    @property
    def auth(self) -> tuple[str, str] | None:
        if self.username is None and self.password is None:
            return None
        return self.username or "", self.password or ""


def redact(url: str) -> str:
    """`url` with its user info (`user:password@`) as `***@`, for messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return re.sub(r"//[^/?#]*@", "//***@", url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def url_problem(base_url: str) -> str | None:
    """Why `base_url` cannot be an API root ("'…' is not an http(s) URL …"), or None."""
    try:
        parts = urlsplit(base_url.strip())
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:                  # an unclosed IPv6 bracket
        ok = False
    return None if ok else f"'{redact(base_url)}' is not an http(s) URL such as http://127.0.0.1:8000/v1"


def endpoint(base_url: str) -> Endpoint:
    """The Endpoint of what the user gave: a bare `http://host:8000` gets `/v1`, and a full
    `.../chat/completions` URL is cut back to its root; a query string is kept apart, for every
    request, and user info apart too (see Endpoint)."""
    problem = url_problem(base_url)
    if problem:
        raise UsageError(f"base URL {problem}")
    parts = urlsplit(base_url.strip())
    netloc = parts.netloc.rsplit("@", 1)[-1]
    path = parts.path.rstrip("/")
    if path.endswith("/chat/completions"):
        path = path[:-len("/chat/completions")]
    elif not path:
        path = "/v1"
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return Endpoint(f"{parts.scheme}://{netloc}{path}", parts.query, username, password)


def chat_url(base_url: str) -> str:
    """`base_url` is what OpenAI clients call it (`http://host:8000/v1`); a bare `http://host:8000`
    gets `/v1`, and a full `.../chat/completions` URL is used as it is (its query kept)."""
    return endpoint(base_url).url("/chat/completions")


def one_line(text, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def error_detail(response) -> str:
    """A short reason out of an error response body (OpenAI's {"error": {"message"}}, FastAPI's
    {"detail"}, or the text)."""
    try:
        body = response.json()
    except ValueError:
        return one_line(response.text)
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return one_line(err["message"])
        for name in ("detail", "message", "error"):
            if body.get(name):
                return one_line(body[name] if isinstance(body[name], str) else str(body[name]))
    return one_line(str(body))


def says_unknown_model(detail: str) -> bool:
    """Whether an error body's reason says the server does not serve the model asked for."""
    return bool(_UNKNOWN_MODEL.search(detail))


def finish_reason(value) -> str:
    return "length" if value in _LENGTH_REASONS else "stop"


def with_thinking(body: dict, thinking: bool | None) -> dict:
    """`body` asking the server's chat template for `enable_thinking=thinking` (the
    `chat_template_kwargs` of vLLM, SGLang and llama.cpp's server); as it is when None."""
    if thinking is not None:
        body["chat_template_kwargs"] = {"enable_thinking": bool(thinking)}
    return body


def chat_body(model: str, conversation: list[dict[str, str]], params: SamplingParams, seed: int | None,
              thinking: bool | None = None) -> dict:
    """A generation request: top_p only when sampling, seed only when given, chat_template_kwargs
    only when thinking is switched (see `with_thinking`)."""
    body = {"model": model, "messages": conversation,
            "max_tokens": params.max_new_tokens, "temperature": params.temperature}
    if not params.greedy:
        body["top_p"] = params.top_p
    if seed is not None:
        body["seed"] = seed
    return with_thinking(body, thinking)


def streaming(body: dict) -> dict:
    """`body` asking for its reply as an event stream, usage in the last chunk."""
    return {**body, "stream": True, "stream_options": {"include_usage": True}}


def scoring_body(model: str, conversation: list[dict[str, str]], prefix: str,
                 thinking: bool | None = None) -> dict:
    """A greedy one-token request with the top alternatives' logprobs; a prefix of the reply goes
    in as a final assistant message that the server continues."""
    body = {"model": model, "messages": list(conversation), "max_tokens": 1, "temperature": 0,
            "logprobs": True, "top_logprobs": TOP_LOGPROBS}
    if prefix:
        body["messages"].append({"role": "assistant", "content": prefix})
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
    return with_thinking(body, thinking)


def probe_body(model: str) -> dict:
    """The cheapest request that proves a server generates with `model`: one token."""
    return {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}


def _text_of(content) -> str | None:
    """The text of a message's content: a string, or a list of parts ({"type": "text", "text"});
    None when there is none."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return "".join(texts) if texts else None
    return None


def _reasoning_of(message: dict) -> str | None:
    """The first of REASONING_FIELDS that holds a non-empty string, stripped; None if none does."""
    for name in REASONING_FIELDS:
        value = message.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def parse_completion(data: dict) -> Completion:
    """The completion in a 2xx reply, with the reasoning the server returned apart, if any. A
    reply with no text and no reasoning raises NoText (retried, and an error after the retries:
    never an empty record). One with reasoning but no content (a model cut by max_tokens while
    still thinking, or one that ended there) is a completion whose text is "". One of the wrong
    shape raises TypeError & co."""
    if not isinstance(data, dict):
        raise TypeError("unexpected field types")
    choices = data.get("choices")
    if not choices:
        raise NoText("the reply has no choices")
    choice = choices[0]
    if not isinstance(choice, dict):
        raise TypeError("unexpected field types")
    message = choice.get("message")
    if not isinstance(message, dict):
        raise NoText("the reply has no message")
    content = message.get("content")
    text = _text_of(content)
    reasoning = _reasoning_of(message)
    if text is None and reasoning is None:
        what = "content is null" if content is None else f"content is {type(content).__name__}"
        raise NoText(f"the reply has no text ({what})")
    usage = data.get("usage") or {}
    if not isinstance(usage, dict):
        raise TypeError("unexpected field types")
    return Completion(text=_unicode((text or "").strip()), finish_reason=finish_reason(choice.get("finish_reason")),
                      prompt_tokens=int(usage.get("prompt_tokens") or 0),
                      completion_tokens=int(usage.get("completion_tokens") or 0),
                      reasoning=_unicode(reasoning) if reasoning is not None else None)


_SURROGATES = re.compile("[\ud800-\udfff]")


def _unicode(text: str) -> str:
    """`text` with lone surrogates (a JSON reply may escape them, `\\ud800`; no UTF-8 holds them)
    as U+FFFD: kept, they fail the next request of the conversation and every record's write."""
    return _SURROGATES.sub("\ufffd", text)


def is_event_stream(headers) -> bool:
    """Whether a reply is a server-sent event stream (headers: a mapping with lower-case lookups)."""
    return (headers.get("content-type") or "").split(";")[0].strip().lower() == "text/event-stream"


def assemble_stream(text: str) -> dict:
    """A streamed reply (server-sent events of `chat.completion.chunk`s) put back into the shape of
    a whole one (see EventStream)."""
    events = EventStream()
    for line in text.splitlines():
        events.feed(line)
        if events.done:
            break
    return events.reply()


class EventStream:
    """A streamed reply read one line at a time, as it arrives: the first choice's content,
    reasoning (`delta.reasoning_content` or `delta.reasoning`), finish reason and logprobs joined
    up, and the last usage seen. `feed` says whether the line added content; `done` is set by
    `data: [DONE]`; `reply()` is the whole reply in the shape of a non-streamed one. An error
    event raises NoText (retried); an event that is not JSON raises ValueError."""

    def __init__(self):
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.logprobs: list = []
        self.seen, self.finish, self.usage, self.done = False, None, None, False

    @property
    def text(self) -> str:
        return "".join(self.content)

    def feed(self, line: str) -> bool:
        if self.done or not line.startswith("data:"):
            return False
        payload = line[len("data:"):].strip()
        if payload == "[DONE]":
            self.done = True
            return False
        chunk = json.loads(payload)
        if not isinstance(chunk, dict):
            raise TypeError("unexpected field types")
        if chunk.get("error"):
            error = chunk["error"]
            detail = error.get("message", error) if isinstance(error, dict) else error
            raise NoText(f"the stream ended in an error: {one_line(detail)}")
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        grew = False
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            self.seen = True
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str):
                self.content.append(delta["content"])
                grew = grew or bool(delta["content"])
            part = next((delta[n] for n in REASONING_FIELDS if isinstance(delta.get(n), str) and delta[n]), None)
            if part is not None:
                self.reasoning.append(part)
            self.finish = choice.get("finish_reason") or self.finish
            if isinstance(choice.get("logprobs"), dict):
                self.logprobs += choice["logprobs"].get("content") or []
        return grew

    def reply(self) -> dict:
        if not self.seen:
            return {"choices": [], "usage": self.usage}
        message = {"role": "assistant", "content": self.text if self.content else None,
                   "reasoning_content": "".join(self.reasoning) if self.reasoning else None}
        return {"choices": [{"index": 0, "finish_reason": self.finish, "message": message,
                             "logprobs": {"content": self.logprobs} if self.logprobs else None}],
                "usage": self.usage}


def parse_top_logprobs(data: dict) -> list[tuple[str, float]] | str:
    """The first generated token's alternatives as (token, logprob) pairs, or why there are none.
    A response with no `choices` is malformed (raises, and is retried); one whose choice has no
    logprobs came from a server that does not give them (a string: retrying will not help)."""
    choice = data["choices"][0]
    if not isinstance(choice, dict):
        raise TypeError("unexpected field types")
    logprobs = choice.get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not content:
        return "the server returned no logprobs (does it support logprobs and top_logprobs for chat completions?)"
    top = content[0].get("top_logprobs")
    if not top:
        return "the server returned no top_logprobs (does it support top_logprobs?)"
    return [(str(entry["token"]), float(entry["logprob"])) for entry in top]


def listed_models(data) -> list[str] | None:
    """The model ids of a `GET /models` reply ({"data": [{"id": …}, …]}); None if it is not one."""
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return None
    return [str(e["id"]) for e in entries if isinstance(e, dict) and e.get("id") is not None]


def choice_of(token: str, choices: tuple[str, ...]) -> str | None:
    """The choice a token stands for: "A", " A", "(A" and " (A" all stand for "A"."""
    token = token.strip()
    if token.startswith("("):
        token = token[1:].strip()
    return token if token in choices else None


def logsumexp(values: list[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return top
    return top + math.log(sum(math.exp(v - top) for v in values))


def scores_from(top: list[tuple[str, float]], choices: tuple[str, ...]) -> ChoiceScores:
    """Each choice's log-probability: the log-sum-exp of the alternatives that stand for it,
    -inf for one that none stands for; an error when none stands for any."""
    found: dict[str, list[float]] = {}
    for token, logprob in top:
        choice = choice_of(token, choices)
        if choice is not None:
            found.setdefault(choice, []).append(logprob)
    logprobs = {c: logsumexp(found[c]) if c in found else -math.inf for c in choices}
    if not found:
        seen = ", ".join(repr(token) for token, _ in top[:5])
        return ChoiceScores(logprobs, error=one_line(
            f"none of {', '.join(choices)} among the top {len(top)} tokens (the top ones: {seen})"))
    return ChoiceScores(logprobs)


def rejected_fields(error: str, status: int | None, body: dict, fields: tuple[str, ...] = SCORING_FIELDS) -> str:
    """`error`, with the fields of `fields` to suspect when a server refused a request that sent
    some of them (400/422)."""
    sent = [f for f in fields if f in body]
    if status not in (400, 422) or not sent:
        return error
    named = [f for f in sent if re.search(rf"\b{f}\b", error)]
    if named:
        hint = f"the server does not take {', '.join(named)}"
        if "continue_final_message" in named:
            hint += " (sent for the prefix; vLLM and SGLang take it)"
        if "chat_template_kwargs" in named:
            hint += " (sent to switch thinking; vLLM, SGLang and llama.cpp's server take it)"
    else:
        hint = f"if the server refused a parameter, suspect {', '.join(sent)}"
    return f"{error}; {hint}"
