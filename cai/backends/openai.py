"""Remote backend: any server that speaks OpenAI's `/v1/chat/completions` (vLLM, SGLang, TGI,
`transformers serve`, hosted APIs).

Requests run on one background thread that owns an asyncio event loop and one
`httpx.AsyncClient`; a stream keeps up to `width` requests in flight. Transient faults
(connection errors, timeouts, HTTP 429 and 5xx, malformed JSON, a reply with neither text nor
reasoning) are retried with exponential backoff plus jitter, honouring `Retry-After`
(cai.backends.retry). A request that fails for good does not raise: it comes back as a
`Completion` with `finish_reason="error"` and a one-line `error`. But when OUTAGE_LIMIT (3) requests in a row fail
for good for connection reasons (refused, DNS, reset, timeout) with no reply from the server in
between, the stream's `poll` raises BackendError: the server is gone, and grinding through the
rest of the prompts would only fill the failures file.

Constructing the backend checks the server first (`check=True`): one `GET /models`, and one
one-token chat completion when the listing is unavailable or does not list the model. A server
that cannot be reached, or that does not serve the model, is a BackendError naming the URL,
within seconds.

`score_choices` reads the log-probabilities of a few one-token answers ("A", "B") from the
`top_logprobs` of a one-token greedy completion, through the same retry loop. A prefix for the
assistant's reply is sent as a final assistant message with `continue_final_message` (the
vLLM / SGLang extension); servers without these (`transformers serve` ignores `logprobs` and
rejects `continue_final_message`) give each conversation an error saying so.

Reasoning the server returns apart from the answer (`reasoning_content` or `reasoning`, whole
or in an event stream) comes back as `Completion.reasoning`; a reply that is all reasoning (cut
by max_tokens while thinking) is a completion with text "", not a failure. `set_thinking` asks
the server's chat template for `enable_thinking` through `chat_template_kwargs`; whether the
template takes it cannot be seen from here (`thinking_switch` is None).

Several endpoints of one model (`base_url` a list: one vLLM per GPU or node) share the requests
through a Fleet (cai.backends.fleet): each attempt goes to the endpoint with the fewest
outstanding, each endpoint has its own limit (`concurrency`, or a per-endpoint one), an endpoint
that keeps failing is taken out and probed until it answers, and what it had in flight is tried
again on the others at once. The construction check asks every endpoint; with `allow_down`,
those that cannot be reached start out taken out instead of failing the run.

The API key is read from an environment variable and only ever put in the Authorization
header: it is scrubbed from every error message this module produces and never logged. User
info in the base URL (`http://user:password@host/v1`) is sent as HTTP basic auth (which then
takes the Authorization header, as httpx did with such a URL) and shown as `***` wherever the
URL is; a query string in it (`?api-version=…`) is kept on every request."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cai.backends import openai_wire as wire
from cai.backends.fleet import Fleet, Member, NoEndpoint
from cai.backends.base import ChoiceScores, Completion, Request, SamplingParams, TextCallback, run_through_stream
from cai.backends.openai_stream import OpenAIStream
from cai.backends.retry import Failed, Fatal, Retryable, RetryPolicy, from_status, from_transport_error
from cai.declare import option
from cai.errors import BackendError, OptionError

log = logging.getLogger("cai")

CHARS_PER_TOKEN = 3         # count_tokens: fewer characters per token than real tokenizers average
TOKENS_PER_MESSAGE = 8      # count_tokens: role markers and separators of the chat template
DEFAULT_CONCURRENCY = 16    # requests in flight unless told otherwise
PREFLIGHT_TIMEOUT = 10.0    # seconds: the longest the construction check waits for one reply
PREFLIGHT_RETRIES = 2       # quick retries of a connection error that came at once (refused, reset)


DEFAULT_KEY_ENV = "OPENAI_API_KEY"      # read when set; a variable the user names must be set


@dataclass
class OpenAISettings:
    """`--backend openai`'s own options (see cai/backends/registry.py)."""

    base_url: str | list[str] | None = option(None, "--base-url", cli=Optional[list[str]], panel="Model", help=(
        "With --backend openai: the server's API root, e.g. http://127.0.0.1:8000/v1. Give it again for more servers "
        "of the same model: each request goes to the one with the fewest in flight, and one that fails is taken out "
        "until it answers again."))
    base_urls: str | None = option(None, "--base-urls", metavar="FILE", panel="Model", help=(
        "With --backend openai: a file of API roots, one a line, each optionally followed by its own --concurrency "
        "(`http://node7:8000/v1 32`)."))
    allow_down: bool = option(False, "--allow-down", panel="Model", help=(
        "With several endpoints: start even if some cannot be reached (they are asked again every few seconds and "
        "join when they answer)."))
    api_key_env: str | None = option(None, "--api-key-env", metavar="NAME", panel="Model", help=(
        "With --backend openai: the environment variable holding the API key (never printed or recorded); a variable "
        "named here must be set. [default: OPENAI_API_KEY, when set]"))
    concurrency: int = option(DEFAULT_CONCURRENCY, "--concurrency", panel="Model", help=(
        "With --backend openai: requests in flight at once (what --batch-size is for a local model)."))
    timeout: float = option(120.0, "--timeout", panel="Model", help=(
        "With --backend openai: seconds before a request is given up and retried."))
    max_retries: int = option(5, "--max-retries", panel="Model", help=(
        "With --backend openai: retries of a failed request (connection errors, timeouts, 429, 5xx, replies without "
        "text)."))


def endpoints(spec) -> list[tuple[str, int | None]]:
    """The API roots `spec` names, each with its own concurrency (None: `concurrency`): those of
    `base_url`, then those of the `base_urls` file (`URL [CONCURRENCY]` a line; blank lines and
    `#` comments skipped). A bad URL or line is an OptionError or InputError naming it."""
    from cai.errors import InputError

    given = [spec.base_url] if isinstance(spec.base_url, str) else list(spec.base_url or ())
    found: list[tuple[str, int | None]] = []
    for url in given:
        if (problem := wire.url_problem(url)) is not None:
            raise OptionError("base_url", problem)
        found.append((url, None))
    if spec.base_urls:
        try:
            lines = Path(spec.base_urls).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise InputError(spec.base_urls, "no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(spec.base_urls, f"cannot read: {getattr(exc, 'strerror', None) or exc}") from None
        for number, line in enumerate(lines, start=1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            if len(words) > 2 or (len(words) == 2 and not (words[1].isdigit() and int(words[1]) >= 1)):
                raise InputError(spec.base_urls, f"expected URL [CONCURRENCY] (got {line.strip()!r})", line=number)
            if (problem := wire.url_problem(words[0])) is not None:
                raise InputError(spec.base_urls, problem, line=number)
            found.append((words[0], int(words[1]) if len(words) == 2 else None))
        if not found:
            raise InputError(spec.base_urls, "holds no URL")
    roots = {}
    for url, _ in found:
        root = wire.endpoint(url).root
        if root in roots:
            raise OptionError("base_url", f"{wire.endpoint(url).shown()} is given twice")
        roots[root] = url
    return found


class OpenAIBackend:
    """Generates through an OpenAI-compatible chat-completions server. The server owns the
    model, its chat template and its tokenizer; `context_length` is unknown and token counts
    are estimates (see `count_tokens`). `concurrency`: requests in flight when the caller names
    no width (`default_width`). `check`: ask the server first whether it answers and serves
    `model` (BackendError if not); tests against a deliberately broken server turn it off."""

    about = "an OpenAI-compatible server (vLLM, SGLang, TGI, transformers serve) at a base URL"
    Settings = OpenAISettings

    @classmethod
    def check_settings(cls, spec) -> None:
        if not (spec.base_url or spec.base_urls) or not spec.model:
            raise OptionError("backend", "openai needs `base_url` URL and `model` NAME (the name the server serves)")
        endpoints(spec)                  # each URL checked, the file read: one line naming what is wrong
        if spec.api_key_env is not None:
            # a variable the user named must hold the key: a typo must not send requests without one
            if not spec.api_key_env.strip():
                raise OptionError("api_key_env", "must name an environment variable")
            value = os.environ.get(spec.api_key_env)
            if value is None or not value.strip():
                raise OptionError("api_key_env", f"the environment variable {spec.api_key_env} is "
                                                 f"{'not set' if value is None else 'empty'}")
        if spec.max_retries < 0:
            raise OptionError("max_retries", f"must be at least 0 (got {spec.max_retries})")
        if spec.timeout <= 0:
            raise OptionError("timeout", f"must be more than 0 (got {spec.timeout:g})")
        if spec.concurrency < 1:
            raise OptionError("concurrency", f"must be at least 1 (got {spec.concurrency})")

    @classmethod
    def resolve(cls, spec) -> tuple[list, str]:
        return endpoints(spec), spec.model

    @classmethod
    def from_spec(cls, spec, source, model_name: str) -> "OpenAIBackend":
        return cls(source, model_name, api_key_env=spec.api_key_env or DEFAULT_KEY_ENV, timeout=spec.timeout,
                   max_retries=spec.max_retries, concurrency=spec.concurrency, allow_down=spec.allow_down)

    def __init__(self, base_url, model: str, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 120.0, max_retries: int = 5, backoff: float = 0.5,
                 concurrency: int = DEFAULT_CONCURRENCY, check: bool = True, allow_down: bool = False):
        """`base_url`: one API root, or a list of them, each a URL or (URL, its own concurrency)."""
        import httpx

        if int(concurrency) < 1:
            raise OptionError("concurrency", f"must be at least 1 (got {concurrency})")
        self.model_name = model
        self.context_length: int | None = None
        self.thinking_switch: bool | None = None      # the server's chat template is out of sight
        self.thinking: bool | None = None
        given = [base_url] if isinstance(base_url, str) else list(base_url)
        if not given:
            raise OptionError("base_url", "needs at least one URL")
        self.fleet = Fleet([Member(wire.endpoint(url), int(limit or concurrency)) for url, limit in
                            (entry if isinstance(entry, tuple) else (entry, None) for entry in given)], self._probe)
        self.endpoint = self.fleet.members[0].endpoint
        # messages: user info as ***, no query
        self.root = (self.endpoint.shown() if not self.fleet.several
                     else f"all {len(self.fleet.members)} endpoints")
        self.url = self.endpoint.url("/chat/completions")       # requests: no user info (see `auth`)
        self.timeout = float(timeout)
        self.concurrency = sum(m.limit for m in self.fleet.members)
        self.policy = RetryPolicy(max_retries, backoff, rng=random.Random())
        self._api_key_env = api_key_env
        self._api_key = (os.environ.get(api_key_env) or "").strip() or None
        self._headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
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
        if check:
            try:
                self._call(self._preflight(allow_down))
            except BaseException:
                self.close()
                raise
        for member in self.fleet.members:
            log.info("remote model %s at %s%s", model, member.endpoint.shown("/chat/completions"),
                     f" (up to {member.limit} requests in flight)" if self.fleet.several else "")

    @property
    def max_retries(self) -> int:
        return self.policy.max_retries

    @property
    def backoff(self) -> float:
        return self.policy.backoff

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

    def set_thinking(self, enabled: bool | None) -> None:
        """Send `chat_template_kwargs: {"enable_thinking": enabled}` with every later request (vLLM,
        SGLang and llama.cpp's server pass it to the template); None sends no such field."""
        self.thinking = None if enabled is None else bool(enabled)

    def default_width(self) -> int:
        """Requests in flight when the caller names no width: the `concurrency` it was built with
        (with several endpoints, the sum of theirs)."""
        return self.concurrency

    def endpoint_report(self) -> list[dict]:
        """Each endpoint's figures so far: URL (as shown), requests (attempts), errors, completion
        tokens, median latency of the attempts that succeeded, times taken out, why it is out."""
        return self.fleet.report()

    def stream(self, params: SamplingParams, width: int, longest: int | None = None,
               on_text: TextCallback | None = None) -> OpenAIStream:
        """With `on_text`, each request asks for `"stream": true` and its reply is read event by
        event as it comes; without it, requests are exactly what they always were."""
        if self._closed:
            raise BackendError(f"{self.model_name}: the backend is closed")
        return OpenAIStream(self, params, width, on_text=on_text)

    def generate(self, conversations: list[list[dict[str, str]]], params: SamplingParams,
                 seed: int | None = None) -> list[Completion]:
        """One completion per conversation, in order, up to `default_width()` requests in flight;
        conversation i is sampled with seed + i. Raises BackendError naming the first request
        that failed for good."""
        if not conversations:
            return []
        completions = run_through_stream(self.stream(params, min(len(conversations), self.default_width())),
                                         conversations, seed)
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
                    error = self._scrub(f"{type(exc).__name__}: {wire.one_line(exc)}")
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
        """`text` without the API key or a URL's password, should either come back in it."""
        for secret in (self._api_key, *(m.endpoint.password for m in self.fleet.members)):
            if secret:
                text = text.replace(secret, "***")
        return text

    def _body(self, conversation: list[dict[str, str]], params: SamplingParams, seed: int | None) -> dict:
        return wire.chat_body(self.model_name, conversation, params, seed, self.thinking)

    def _scoring_body(self, conversation: list[dict[str, str]], prefix: str) -> dict:
        return wire.scoring_body(self.model_name, conversation, prefix, self.thinking)

    async def _attempt(self, body: dict, parse, on_text=None, tried: list[Member] | None = None):
        """One POST, to the endpoint the fleet picks (another than the last one `tried`, where
        there is room): see `_attempt_at`. An attempt an endpoint failed for its own reasons is
        retried elsewhere at once where that endpoint is now out and others are up."""
        try:
            member = await self.fleet.acquire(avoid=tried[-1] if tried else None)
        except NoEndpoint as exc:
            raise Retryable(str(exc), connection=True) from None
        if tried is not None:
            tried.append(member)
        start = time.monotonic()
        try:
            result = await self._attempt_at(member, body, parse, on_text)
        except Retryable as exc:
            its_fault = exc.connection or exc.reason.startswith("HTTP 5")
            out = await self.fleet.done(member, ok=False, its_fault=its_fault, reason=exc.reason)
            if not self.fleet.several:
                raise
            wait = 0.0 if out and self.fleet.up() else exc.wait
            raise Retryable(f"{member.shown}: {exc.reason}", wait, exc.connection) from None
        except Fatal as exc:
            await self.fleet.done(member, ok=False, reason=exc.reason)
            if self.fleet.several:
                raise Fatal(f"{member.shown}: {exc.reason}", exc.status) from None
            raise
        except BaseException:
            await asyncio.shield(self.fleet.done(member, ok=False, reason="cancelled"))
            raise
        await self.fleet.done(member, ok=True, latency=time.monotonic() - start,
                              tokens=getattr(result, "completion_tokens", 0) or 0)
        return result

    async def _attempt_at(self, member: Member, body: dict, parse, on_text=None):
        """One POST to `member`; `parse(json)` makes the result out of a 2xx body, an event stream
        being put back together first (a body of the wrong shape, or without text, makes the
        attempt retryable). With `on_text` (a streamed request), the reply is read as it arrives."""
        import httpx

        url = member.endpoint.url("/chat/completions")
        if on_text is not None:
            return await self._attempt_streamed(member, url, body, parse, on_text)
        try:
            response = await asyncio.wait_for(
                self._client.post(url, json=body, headers=self._headers, auth=member.endpoint.auth), self.timeout)
        except (asyncio.TimeoutError, httpx.RequestError, httpx.InvalidURL) as exc:
            raise from_transport_error(exc, self.timeout, member.endpoint.shown("/chat/completions")) from None
        status = response.status_code
        if not 200 <= status < 300:
            raise from_status(status, response.headers, lambda: wire.error_detail(response))
        try:
            data = wire.assemble_stream(response.text) if wire.is_event_stream(response.headers) else response.json()
            return parse(data)
        except wire.NoText as exc:
            raise Retryable(str(exc)) from None
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise Retryable(f"malformed response ({type(exc).__name__})") from None

    async def _attempt_streamed(self, member: Member, url: str, body: dict, parse, on_text):
        """One streamed POST, its events read as they arrive; `on_text(content so far)` each time
        the content grows. A reply that is not an event stream is read whole."""
        import httpx

        async def read():
            async with self._client.stream("POST", url, json=body, headers=self._headers,
                                           auth=member.endpoint.auth) as response:
                status = response.status_code
                if not 200 <= status < 300:
                    await response.aread()
                    raise from_status(status, response.headers, lambda: wire.error_detail(response))
                if not wire.is_event_stream(response.headers):
                    await response.aread()
                    return response.json()
                events = wire.EventStream()
                async for line in response.aiter_lines():
                    if events.feed(line):
                        on_text(events.text.strip())
                    if events.done:
                        break
                return events.reply()

        try:
            return parse(await asyncio.wait_for(read(), self.timeout))
        except (asyncio.TimeoutError, httpx.RequestError, httpx.InvalidURL) as exc:
            raise from_transport_error(exc, self.timeout, member.endpoint.shown("/chat/completions")) from None
        except wire.NoText as exc:
            raise Retryable(str(exc)) from None
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise Retryable(f"malformed response ({type(exc).__name__})") from None

    async def _post(self, key: str, body: dict, parse, on_text=None):
        """POST `body`, retrying transient faults (on another endpoint where there are several);
        the parsed result, or Failed."""
        tried: list[Member] = []
        return await self.policy.run(lambda: self._attempt(body, parse, on_text, tried),
                                     what=f"{self.model_name}: request {key}", scrub=self._scrub)

    async def _complete(self, request: Request, params: SamplingParams, on_text=None) -> Completion:
        """The completion of one request; raises Failed when it failed for good (a refusal of
        `chat_template_kwargs` says that is what was refused). With `on_text`, a streamed request
        (see `stream`)."""
        body = self._body(request.conversation, params, request.seed)
        if on_text is not None:
            body = wire.streaming(body)
        try:
            return await self._post(request.key, body, wire.parse_completion, on_text)
        except Failed as failure:
            error = wire.rejected_fields(failure.error, failure.status, body, ("chat_template_kwargs",))
            if error == failure.error:
                raise
            raise Failed(error, failure.status, failure.connection) from None

    async def _score(self, key: str, conversation: list[dict[str, str]], choices: tuple[str, ...],
                     prefix: str) -> ChoiceScores:
        body = self._scoring_body(conversation, prefix)
        try:
            top = await self._post(key, body, wire.parse_top_logprobs)
        except Failed as failure:
            return ChoiceScores(dict.fromkeys(choices, -math.inf),
                                error=wire.rejected_fields(failure.error, failure.status, body))
        if isinstance(top, str):
            return ChoiceScores(dict.fromkeys(choices, -math.inf), error=top)
        return wire.scores_from(top, choices)

    # ---- the check at construction ----

    async def _preflight(self, allow_down: bool = False) -> None:
        from cai.backends.openai_check import check_fleet

        await check_fleet(self, min(self.timeout, PREFLIGHT_TIMEOUT), PREFLIGHT_RETRIES, allow_down)

    async def _probe(self, member: Member) -> bool:
        """Whether an endpoint taken out answers again: any HTTP reply below 500 to GET /models."""
        try:
            response = await asyncio.wait_for(
                self._client.get(member.endpoint.url("/models"), headers=self._headers, auth=member.endpoint.auth,
                                 timeout=min(self.timeout, PREFLIGHT_TIMEOUT)), min(self.timeout, PREFLIGHT_TIMEOUT) + 1)
        except Exception:  # noqa: BLE001 -- any failure is "not yet"
            return False
        return response.status_code < 500
