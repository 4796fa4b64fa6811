"""Remote backend: any server that speaks OpenAI's `/v1/chat/completions` (vLLM, SGLang, TGI,
`transformers serve`, hosted APIs).

Requests run on one background thread that owns an asyncio event loop and one
`httpx.AsyncClient`; a stream keeps up to `width` requests in flight. Transient faults
(connection errors, timeouts, HTTP 429 and 5xx, malformed JSON) are retried with exponential
backoff plus jitter, honouring `Retry-After`. A request that fails for good does not raise: it
comes back as a `Completion` with `finish_reason="error"` and a one-line `error`.

`score_choices` reads the log-probabilities of a few one-token answers ("A", "B") from the
`top_logprobs` of a one-token greedy completion, through the same retry loop. A prefix for the
assistant's reply is sent as a final assistant message with `continue_final_message` (the
vLLM / SGLang extension); servers without these (`transformers serve` ignores `logprobs` and
rejects `continue_final_message`) give each conversation an error saying so.

The API key is read from an environment variable and only ever put in the Authorization
header: it is scrubbed from every error message this module produces and never logged."""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import itertools
import logging
import math
import os
import queue
import random
import re
import threading
import time
from urllib.parse import urlsplit

from cai.backends.base import ChoiceScores, Completion, Request, SamplingParams
from cai.errors import BackendError, UsageError

log = logging.getLogger("cai")

MAX_BACKOFF = 30.0          # seconds: the longest computed (not server-requested) wait between attempts
MAX_RETRY_AFTER = 60.0      # seconds: the longest Retry-After we honour
CHARS_PER_TOKEN = 3         # count_tokens: fewer characters per token than real tokenizers average
TOKENS_PER_MESSAGE = 8      # count_tokens: role markers and separators of the chat template
GENERATE_WIDTH = 32         # requests in flight for `generate`
TOP_LOGPROBS = 20           # score_choices: alternatives asked for (OpenAI's maximum, vLLM's default cap)

# Fields score_choices sends that a server may not take; a 400/422 is explained by naming them.
_SCORING_FIELDS = ("logprobs", "top_logprobs", "continue_final_message", "add_generation_prompt")

_LENGTH_REASONS = {"length", "max_tokens", "model_length", "max_length"}


def _chat_url(base_url: str) -> str:
    """`base_url` is what OpenAI clients call it (`http://host:8000/v1`); a bare `http://host:8000`
    gets `/v1`, and a full `.../chat/completions` URL is used as it is."""
    url = base_url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"base URL '{base_url}' is not an http(s) URL such as http://127.0.0.1:8000/v1")
    if url.endswith("/chat/completions"):
        return url
    if parts.path in ("", "/"):
        url += "/v1"
    return url + "/chat/completions"


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None if absent
    or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _error_detail(response) -> str:
    """A short reason out of an error response body (OpenAI's {"error": {"message"}}, FastAPI's
    {"detail"}, or the text)."""
    try:
        body = response.json()
    except ValueError:
        return _one_line(response.text)
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return _one_line(err["message"])
        for field in ("detail", "message", "error"):
            if body.get(field):
                return _one_line(body[field] if isinstance(body[field], str) else str(body[field]))
    return _one_line(str(body))


def _finish_reason(value) -> str:
    return "length" if value in _LENGTH_REASONS else "stop"


class _Retryable(Exception):
    """An attempt that failed in a way worth trying again."""

    def __init__(self, reason: str, wait: float | None = None):
        super().__init__(reason)
        self.reason, self.wait = reason, wait


class _Fatal(Exception):
    """An attempt that failed in a way that trying again will not fix."""

    def __init__(self, reason: str, status: int | None = None):
        super().__init__(reason)
        self.status = status


class _Failed(Exception):
    """A request that failed for good: `error` is its one-line, scrubbed reason; `status` the
    HTTP status of a client error that ended it (None for anything else)."""

    def __init__(self, error: str, status: int | None = None):
        super().__init__(error)
        self.error, self.status = error, status


def _parse_completion(data: dict) -> Completion:
    choice = data["choices"][0]
    text = choice["message"].get("content") or ""
    usage = data.get("usage") or {}
    if not isinstance(text, str) or not isinstance(usage, dict):
        raise TypeError("unexpected field types")
    return Completion(text=text.strip(), finish_reason=_finish_reason(choice.get("finish_reason")),
                      prompt_tokens=int(usage.get("prompt_tokens") or 0),
                      completion_tokens=int(usage.get("completion_tokens") or 0))


def _parse_top_logprobs(data: dict) -> list[tuple[str, float]] | str:
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


def _choice_of(token: str, choices: tuple[str, ...]) -> str | None:
    """The choice a token stands for: "A", " A", "(A" and " (A" all stand for "A"."""
    token = token.strip()
    if token.startswith("("):
        token = token[1:].strip()
    return token if token in choices else None


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return top
    return top + math.log(sum(math.exp(v - top) for v in values))


def _scores_from(top: list[tuple[str, float]], choices: tuple[str, ...]) -> ChoiceScores:
    """Each choice's log-probability: the log-sum-exp of the alternatives that stand for it,
    -inf for one that none stands for; an error when none stands for any."""
    found: dict[str, list[float]] = {}
    for token, logprob in top:
        choice = _choice_of(token, choices)
        if choice is not None:
            found.setdefault(choice, []).append(logprob)
    logprobs = {c: _logsumexp(found[c]) if c in found else -math.inf for c in choices}
    if not found:
        seen = ", ".join(repr(token) for token, _ in top[:5])
        return ChoiceScores(logprobs, error=_one_line(
            f"none of {', '.join(choices)} among the top {len(top)} tokens (the top ones: {seen})"))
    return ChoiceScores(logprobs)


def _rejected_fields(failure: _Failed, body: dict) -> str:
    """`failure`'s error, with the fields to suspect when a server refused a scoring request."""
    if failure.status not in (400, 422):
        return failure.error
    sent = [f for f in _SCORING_FIELDS if f in body]
    named = [f for f in sent if re.search(rf"\b{f}\b", failure.error)]
    if named:
        hint = f"the server does not take {', '.join(named)}"
        if "continue_final_message" in named:
            hint += " (sent for the prefix; vLLM and SGLang take it)"
    else:
        hint = f"if the server refused a parameter, suspect {', '.join(sent)}"
    return f"{failure.error}; {hint}"


class OpenAIBackend:
    """Generates through an OpenAI-compatible chat-completions server. The server owns the
    model, its chat template and its tokenizer; `context_length` is unknown and token counts
    are estimates (see `count_tokens`)."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 120.0, max_retries: int = 5, backoff: float = 0.5):
        import httpx

        self.model_name = model
        self.context_length: int | None = None
        self.url = _chat_url(base_url)
        self.timeout = float(timeout)
        self.max_retries = max(0, int(max_retries))
        self.backoff = max(0.0, float(backoff))
        self._api_key = (os.environ.get(api_key_env) or "").strip() or None
        self._headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        self._jitter = random.Random()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="cai-openai", daemon=True)
        self._thread.start()

        async def make_client():
            return httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
                headers={"User-Agent": "cai"},
            )

        self._client = self._call(make_client())
        log.info("remote model %s at %s", model, self.url)

    # ---- the loop thread ----

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _call(self, coro, timeout: float | None = None):
        """Run a coroutine on the loop thread and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _schedule(self, coro) -> concurrent.futures.Future:
        if self._closed:
            coro.close()
            raise BackendError(f"{self.model_name}: the backend is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    # ---- Backend protocol ----

    def count_tokens(self, conversation: list[dict[str, str]]) -> int:
        """An estimate, not a count: the server's tokenizer is out of reach. Characters // 3 plus 8
        a message errs high for English text (real tokenizers average about 4 characters a
        token), so length checks made with it are conservative."""
        chars = sum(len(m.get("content") or "") for m in conversation)
        return chars // CHARS_PER_TOKEN + TOKENS_PER_MESSAGE * len(conversation)

    def default_width(self) -> int:
        """Requests in flight when --batch-size is not given."""
        return 16

    def stream(self, params: SamplingParams, width: int, longest: int | None = None) -> OpenAIStream:
        if self._closed:
            raise BackendError(f"{self.model_name}: the backend is closed")
        return OpenAIStream(self, params, width)

    def generate(self, conversations: list[list[dict[str, str]]], params: SamplingParams,
                 seed: int | None = None) -> list[Completion]:
        """One completion per conversation, in order; conversation i is sampled with seed + i.
        Raises BackendError naming the first request that failed for good."""
        if not conversations:
            return []
        stream = self.stream(params, min(len(conversations), GENERATE_WIDTH))
        for i, conversation in enumerate(conversations):
            stream.submit(Request(key=str(i), conversation=conversation,
                                  seed=None if seed is None else seed + i))
        results: dict[str, Completion] = {}
        while len(results) < len(conversations):
            finished = stream.poll()
            if not finished:
                break
            results.update(finished)
        completions = [results[str(i)] for i in range(len(conversations))]
        for i, completion in enumerate(completions):
            if completion.error is not None:
                raise BackendError(f"{self.model_name}: request {i + 1} of {len(conversations)} "
                                   f"failed: {completion.error}")
        return completions

    def score_choices(self, conversations: list[list[dict[str, str]]], choices: tuple[str, ...],
                      prefix: str = "", width: int | None = None) -> list[ChoiceScores]:
        """For each conversation, the log-probability of each choice as the first token of the
        assistant's reply, which starts with `prefix`: one greedy one-token request per
        conversation, up to `width` (default: `default_width()`) in flight. One result per
        conversation, in order; each has every choice (-inf: not among the server's top
        alternatives). A conversation that could not be scored has `error` set (and every choice
        at -inf): the request failed for good, the server gave no logprobs, or no choice was among
        them. Raises BackendError only if the backend is or gets closed (and ValueError for
        choices that are empty or padded with spaces)."""
        choices = tuple(choices)
        if not choices or any(not c or c != c.strip() for c in choices):
            raise ValueError(f"choices must be non-empty strings without surrounding spaces, not {choices!r}")
        if not conversations:
            if self._closed:
                raise BackendError(f"{self.model_name}: the backend is closed")
            return []
        width = max(1, int(width or self.default_width()))

        async def score_all():
            semaphore = asyncio.Semaphore(width)

            async def one(i: int, conversation) -> ChoiceScores:
                try:
                    async with semaphore:
                        return await self._score(str(i), conversation, choices, prefix)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 -- one conversation's bug must not lose the others
                    error = self._scrub(f"{type(exc).__name__}: {_one_line(exc)}")
                    log.debug("%s: scoring %d failed: %s", self.model_name, i, error)
                    return ChoiceScores(dict.fromkeys(choices, -math.inf), error=error)

            return await asyncio.gather(*(one(i, c) for i, c in enumerate(conversations)))

        try:
            return list(self._schedule(score_all()).result())
        except concurrent.futures.CancelledError:
            raise BackendError(f"{self.model_name}: the backend closed with requests in flight") from None

    def close(self) -> None:
        """Cancel what is in flight, close the HTTP client and stop the loop thread."""
        if self._closed:
            return
        self._closed = True

        async def shutdown():
            current = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._client.aclose()

        try:
            self._call(shutdown(), timeout=10)
        except Exception as exc:  # noqa: BLE001 -- closing must not fail a run that is otherwise over
            log.debug("closing the HTTP client: %s", type(exc).__name__)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> OpenAIBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- one request ----

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _body(self, conversation: list[dict[str, str]], params: SamplingParams, seed: int | None) -> dict:
        body = {"model": self.model_name, "messages": conversation,
                "max_tokens": params.max_new_tokens, "temperature": params.temperature}
        if not params.greedy:
            body["top_p"] = params.top_p
        if seed is not None:
            body["seed"] = seed
        return body

    def _delay(self, attempt: int) -> float:
        """Exponential backoff with jitter: between half and all of backoff * 2^(attempt-1)."""
        base = min(MAX_BACKOFF, self.backoff * 2 ** (attempt - 1))
        return base * (0.5 + 0.5 * self._jitter.random())

    def _scoring_body(self, conversation: list[dict[str, str]], prefix: str) -> dict:
        body = {"model": self.model_name, "messages": list(conversation), "max_tokens": 1, "temperature": 0,
                "logprobs": True, "top_logprobs": TOP_LOGPROBS}
        if prefix:
            body["messages"].append({"role": "assistant", "content": prefix})
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        return body

    async def _attempt(self, body: dict, parse):
        """One POST; `parse(json)` makes the result out of a 2xx body (any of the exceptions a
        body of the wrong shape raises makes the attempt retryable)."""
        import httpx

        try:
            response = await asyncio.wait_for(
                self._client.post(self.url, json=body, headers=self._headers), self.timeout)
        except asyncio.TimeoutError:
            raise _Retryable(f"timeout ({self.timeout:g}s)") from None
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            raise _Fatal(f"bad URL {self.url}: {_one_line(exc)}") from None
        except httpx.TimeoutException:
            raise _Retryable(f"timeout ({self.timeout:g}s)") from None
        except httpx.RequestError as exc:
            raise _Retryable(f"{type(exc).__name__}: {_one_line(exc).rstrip('.') or 'connection failed'}") from None
        status = response.status_code
        if status == 429 or status >= 500:
            raise _Retryable(f"HTTP {status}", _retry_after(response.headers.get("retry-after")))
        if not 200 <= status < 300:
            raise _Fatal(f"HTTP {status}: {_error_detail(response)}", status)
        try:
            return parse(response.json())
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise _Retryable(f"malformed response ({type(exc).__name__})") from None

    async def _post(self, key: str, body: dict, parse):
        """POST `body`, retrying transient faults; the parsed result, or _Failed."""
        attempts = self.max_retries + 1
        status = None
        for attempt in range(1, attempts + 1):
            try:
                return await self._attempt(body, parse)
            except _Fatal as exc:
                reason, attempts, status = str(exc), attempt, exc.status
                break
            except _Retryable as exc:
                reason = exc.reason
                if attempt == attempts:
                    break
                wait = exc.wait if exc.wait is not None else self._delay(attempt)
                log.debug("%s: request %s: %s; retrying in %.2fs (attempt %d of %d)",
                          self.model_name, key, self._scrub(reason), wait, attempt + 1, attempts)
                await asyncio.sleep(wait)
        error = self._scrub(f"{reason} after {attempts} attempt{'s' if attempts > 1 else ''}")
        log.debug("%s: request %s failed: %s", self.model_name, key, error)
        raise _Failed(error, status)

    async def _complete(self, request: Request, params: SamplingParams) -> Completion:
        try:
            return await self._post(request.key, self._body(request.conversation, params, request.seed),
                                    _parse_completion)
        except _Failed as failure:
            return Completion(text="", finish_reason="error", prompt_tokens=0, completion_tokens=0,
                              error=failure.error)

    async def _score(self, key: str, conversation: list[dict[str, str]], choices: tuple[str, ...],
                     prefix: str) -> ChoiceScores:
        body = self._scoring_body(conversation, prefix)
        try:
            top = await self._post(key, body, _parse_top_logprobs)
        except _Failed as failure:
            return ChoiceScores(dict.fromkeys(choices, -math.inf), error=_rejected_fields(failure, body))
        if isinstance(top, str):
            return ChoiceScores(dict.fromkeys(choices, -math.inf), error=top)
        return _scores_from(top, choices)


class OpenAIStream:
    """Up to `width` requests in flight on the backend's loop thread. `poll` blocks until at least
    one has finished and returns every one that has; a key released while in flight is
    cancelled and never comes back."""

    def __init__(self, backend: OpenAIBackend, params: SamplingParams, width: int):
        self.backend, self.params = backend, params
        self.width = max(1, int(width))

        async def make_semaphore():
            return asyncio.Semaphore(self.width)

        self._semaphore = backend._call(make_semaphore())
        self._results: queue.Queue = queue.Queue()
        self._pending: dict[str, tuple[int, concurrent.futures.Future]] = {}
        self._tickets = itertools.count()
        self._lock = threading.Lock()

    def submit(self, request: Request) -> None:
        ticket = next(self._tickets)
        with self._lock:
            if request.key in self._pending:
                raise BackendError(f"request '{request.key}' is already in flight")
            future = self.backend._schedule(self._run(ticket, request))
            self._pending[request.key] = (ticket, future)

    async def _run(self, ticket: int, request: Request) -> None:
        try:
            async with self._semaphore:
                completion = await self.backend._complete(request, self.params)
        except asyncio.CancelledError:
            raise                      # released, or the backend closed: nobody waits for it
        except Exception as exc:  # noqa: BLE001 -- a bug here must not leave poll waiting forever
            error = self.backend._scrub(f"{type(exc).__name__}: {_one_line(exc)}")
            log.debug("%s: request %s failed: %s", self.backend.model_name, request.key, error)
            completion = Completion(text="", finish_reason="error", prompt_tokens=0, completion_tokens=0,
                                    error=error)
        self._results.put((ticket, request.key, completion))

    def poll(self) -> list[tuple[str, Completion]]:
        finished: list[tuple[str, Completion]] = []
        while True:
            with self._lock:
                if finished or not self._pending:
                    return finished
            try:
                item = self._results.get(timeout=0.5)
            except queue.Empty:
                if self.backend._closed or not self.backend._thread.is_alive():
                    raise BackendError(f"{self.backend.model_name}: the backend closed with requests "
                                       "in flight") from None
                continue
            while True:
                ticket, key, completion = item
                with self._lock:
                    if key in self._pending and self._pending[key][0] == ticket:
                        del self._pending[key]
                        finished.append((key, completion))
                try:
                    item = self._results.get_nowait()
                except queue.Empty:
                    break

    def release(self, key: str) -> None:
        with self._lock:
            entry = self._pending.pop(key, None)
        if entry is not None:
            entry[1].cancel()
