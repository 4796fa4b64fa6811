"""The retry policy of remote requests, apart from any server: which failures are tried again,
how long to wait between attempts, and when a run of failures means the server is gone.

- An attempt either succeeds, raises `Retryable` (connection errors, timeouts, HTTP 429 and
  5xx, a reply that is malformed or has no text) or raises `Fatal` (a bad URL, any other 4xx:
  the same request would fail the same way again).
- `RetryPolicy.run` makes up to `max_retries + 1` attempts, waiting exponential backoff with
  jitter between them (or the server's `Retry-After`), and raises `Failed` with one line when
  the last one fails. `Failed.connection` says whether it failed for want of any reply from the
  server (refused, DNS, reset, timeout) rather than because of what the server answered.
- `Outage` counts requests that failed for good for connection reasons in a row; a request that
  got any reply from the server resets it. At `limit` in a row the server is taken to be gone.

Nothing here imports httpx at module level; `from_transport_error` maps its exceptions."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, TypeVar

log = logging.getLogger("cai")

MAX_BACKOFF = 30.0          # seconds: the longest computed (not server-requested) wait between attempts
MAX_RETRY_AFTER = 60.0      # seconds: the longest Retry-After we honour
OUTAGE_LIMIT = 3            # requests failed for good for connection reasons in a row that stop a stream

T = TypeVar("T")


class Retryable(Exception):
    """An attempt that failed in a way worth trying again. `wait`: what the server asked for
    (Retry-After), if anything; `connection`: no reply came from the server at all."""

    def __init__(self, reason: str, wait: float | None = None, connection: bool = False):
        super().__init__(reason)
        self.reason, self.wait, self.connection = reason, wait, connection


class Fatal(Exception):
    """An attempt that failed in a way that trying again will not fix (`status`: the HTTP status
    of a client error, None for anything else)."""

    def __init__(self, reason: str, status: int | None = None):
        super().__init__(reason)
        self.reason, self.status = reason, status


class Failed(Exception):
    """A request that failed for good: `error` is its one-line reason; `status` the HTTP status of
    a client error that ended it (None for anything else); `connection` whether the last attempt
    got no reply from the server at all."""

    def __init__(self, error: str, status: int | None = None, connection: bool = False):
        super().__init__(error)
        self.error, self.status, self.connection = error, status, connection


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), at most
    MAX_RETRY_AFTER; None if absent or unreadable."""
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
    if seconds != seconds:      # NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def is_retryable_status(status: int) -> bool:
    """429 (slow down) and 5xx (the server's own trouble) are worth another try; other non-2xx are not."""
    return status == 429 or status >= 500


def from_status(status: int, headers, detail: Callable[[], str]) -> Retryable | Fatal:
    """The failure a non-2xx reply stands for. `headers` is a mapping with lower-case lookups
    (Retry-After is read from it); `detail()` gives a short reason out of the body (only asked
    for client errors, where it is the whole story)."""
    if is_retryable_status(status):
        return Retryable(f"HTTP {status}", retry_after(headers.get("retry-after")))
    return Fatal(f"HTTP {status}: {detail()}", status)


def _one_line(text, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def from_transport_error(exc: BaseException, timeout: float, url: str) -> Retryable | Fatal:
    """The failure an exception of the HTTP client (httpx) or of asyncio.wait_for stands for:
    a bad URL is fatal; timeouts and every other transport error are retryable connection failures."""
    import httpx

    if isinstance(exc, (asyncio.TimeoutError, httpx.TimeoutException)):
        return Retryable(f"timeout ({timeout:g}s)", connection=True)
    if isinstance(exc, (httpx.UnsupportedProtocol, httpx.InvalidURL)):
        return Fatal(f"bad URL {url}: {_one_line(exc)}")
    reason = _one_line(exc).rstrip(".") or "connection failed"
    return Retryable(f"{type(exc).__name__}: {reason}", connection=True)


@dataclass
class RetryPolicy:
    """How many times a request is tried and how long to wait in between."""

    max_retries: int = 5
    backoff: float = 0.5            # seconds: the first computed wait (then doubling, up to max_backoff)
    max_backoff: float = MAX_BACKOFF
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self):
        self.max_retries = max(0, int(self.max_retries))
        self.backoff = max(0.0, float(self.backoff))

    @property
    def attempts(self) -> int:
        return self.max_retries + 1

    def delay(self, attempt: int, requested: float | None = None) -> float:
        """The wait after failed attempt `attempt` (1-based): what the server asked for if it did
        (Retry-After, already capped), else between half and all of backoff * 2^(attempt-1),
        capped at max_backoff."""
        if requested is not None:
            return requested
        base = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        return base * (0.5 + 0.5 * self.rng.random())

    async def run(self, attempt: Callable[[], Awaitable[T]], *, what: str = "request",
                  scrub: Callable[[str], str] = str,
                  sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> T:
        """Call `attempt()` until it returns, raises Fatal, or has raised Retryable `attempts`
        times; the result, or Failed. `scrub` cleans text before it is logged or kept (the API
        key); `sleep` is asyncio.sleep (tests pass their own)."""
        attempts, status, connection = self.attempts, None, False
        reason = "no attempt made"
        for n in range(1, attempts + 1):
            try:
                return await attempt()
            except Fatal as exc:
                reason, attempts, status, connection = exc.reason, n, exc.status, False
                break
            except Retryable as exc:
                reason, connection = exc.reason, exc.connection
                if n == attempts:
                    break
                wait = self.delay(n, exc.wait)
                log.debug("%s: %s; retrying in %.2fs (attempt %d of %d)", what, scrub(reason), wait, n + 1, attempts)
                await sleep(wait)
        error = scrub(f"{reason} after {attempts} attempt{'s' if attempts > 1 else ''}")
        log.debug("%s failed: %s", what, error)
        raise Failed(error, status, connection)


class Outage:
    """Requests that failed for good for connection reasons in a row. `record(failure)` with the
    Failed of a request (None for one that succeeded) returns the last reason once `limit` such
    failures have come in a row, else None. A success, or a failure the server answered (a 400 for
    one prompt, a 500), resets the count: the server is up."""

    def __init__(self, limit: int = OUTAGE_LIMIT):
        self.limit = max(1, int(limit))
        self.count = 0
        self.reason: str | None = None

    def record(self, failure: Failed | None) -> str | None:
        if failure is None or not failure.connection:
            self.count, self.reason = 0, None
            return None
        self.count += 1
        self.reason = failure.error
        return self.reason if self.count >= self.limit else None

    @property
    def down(self) -> bool:
        return self.count >= self.limit
