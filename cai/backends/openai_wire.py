"""The wire format of OpenAI-compatible chat-completion servers: URLs, request bodies, and the
reading of replies (completions, logprobs, error bodies, model listings). Pure functions: no
HTTP client, no event loop."""

from __future__ import annotations

import math
import re
from urllib.parse import urlsplit

from cai.backends.base import ChoiceScores, Completion, SamplingParams
from cai.errors import UsageError

TOP_LOGPROBS = 20           # score_choices: alternatives asked for (OpenAI's maximum, vLLM's default cap)

# Fields score_choices sends that a server may not take; a 400/422 is explained by naming them.
SCORING_FIELDS = ("logprobs", "top_logprobs", "continue_final_message", "add_generation_prompt")

_LENGTH_REASONS = {"length", "max_tokens", "model_length", "max_length"}

# How servers say they do not serve a model: vLLM and OpenAI "The model `x` does not exist",
# Ollama "model 'x' not found", `transformers serve` "Server is pinned to 'y'; requested 'x'".
_UNKNOWN_MODEL = re.compile(r"does not exist|not found|unknown model|no such model|model .*not (?:available|served)"
                            r"|is pinned to|not a valid model", re.IGNORECASE)


class NoText(ValueError):
    """A 2xx reply that carries no text: no choices, no message, or content null. The attempt is
    retried like a 5xx."""


def api_root(base_url: str) -> str:
    """The API root (`http://host:8000/v1`) of what the user gave: a bare `http://host:8000` gets
    `/v1`, and a full `.../chat/completions` URL is cut back to its root."""
    url = base_url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"base URL '{base_url}' is not an http(s) URL such as http://127.0.0.1:8000/v1")
    if url.endswith("/chat/completions"):
        return url[:-len("/chat/completions")]
    if parts.path in ("", "/"):
        url += "/v1"
    return url


def chat_url(base_url: str) -> str:
    """`base_url` is what OpenAI clients call it (`http://host:8000/v1`); a bare `http://host:8000`
    gets `/v1`, and a full `.../chat/completions` URL is used as it is."""
    return api_root(base_url) + "/chat/completions"


def models_url(base_url: str) -> str:
    return api_root(base_url) + "/models"


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


def chat_body(model: str, conversation: list[dict[str, str]], params: SamplingParams, seed: int | None) -> dict:
    """A generation request: top_p only when sampling, seed only when given."""
    body = {"model": model, "messages": conversation,
            "max_tokens": params.max_new_tokens, "temperature": params.temperature}
    if not params.greedy:
        body["top_p"] = params.top_p
    if seed is not None:
        body["seed"] = seed
    return body


def scoring_body(model: str, conversation: list[dict[str, str]], prefix: str) -> dict:
    """A greedy one-token request with the top alternatives' logprobs; a prefix of the reply goes
    in as a final assistant message that the server continues."""
    body = {"model": model, "messages": list(conversation), "max_tokens": 1, "temperature": 0,
            "logprobs": True, "top_logprobs": TOP_LOGPROBS}
    if prefix:
        body["messages"].append({"role": "assistant", "content": prefix})
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
    return body


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


def parse_completion(data: dict) -> Completion:
    """The completion in a 2xx reply. A reply with no text raises NoText (retried, and an error
    after the retries: never an empty record); one of the wrong shape raises TypeError & co."""
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
    if text is None:
        what = "content is null" if content is None else f"content is {type(content).__name__}"
        reason = f"the reply has no text ({what})"
        if message.get("reasoning_content") or message.get("reasoning"):
            reason += ("; it has only reasoning_content, which cai does not use yet (a reasoning model "
                       "that spent its tokens thinking? raise --max-new-tokens or turn its reasoning off)")
        raise NoText(reason)
    usage = data.get("usage") or {}
    if not isinstance(usage, dict):
        raise TypeError("unexpected field types")
    return Completion(text=text.strip(), finish_reason=finish_reason(choice.get("finish_reason")),
                      prompt_tokens=int(usage.get("prompt_tokens") or 0),
                      completion_tokens=int(usage.get("completion_tokens") or 0))


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


def rejected_fields(error: str, status: int | None, body: dict) -> str:
    """`error`, with the fields to suspect when a server refused a scoring request (400/422)."""
    if status not in (400, 422):
        return error
    sent = [f for f in SCORING_FIELDS if f in body]
    named = [f for f in sent if re.search(rf"\b{f}\b", error)]
    if named:
        hint = f"the server does not take {', '.join(named)}"
        if "continue_final_message" in named:
            hint += " (sent for the prefix; vLLM and SGLang take it)"
    else:
        hint = f"if the server refused a parameter, suspect {', '.join(sent)}"
    return f"{error}; {hint}"
