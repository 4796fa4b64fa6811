"""The Stream of the remote backend: requests in flight on the backend's loop thread, and the
stop when every request fails for want of a server."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
from typing import TYPE_CHECKING

from cai.backends.base import Completion, Request, SamplingParams, TextCallback
from cai.backends.openai_wire import one_line
from cai.backends.retry import OUTAGE_LIMIT, Failed, Outage
from cai.errors import BackendError

if TYPE_CHECKING:
    from cai.backends.openai import OpenAIBackend

log = logging.getLogger("cai")


def _error(error: str) -> Completion:
    return Completion(text="", finish_reason="error", prompt_tokens=0, completion_tokens=0, error=error)


class OpenAIStream:
    """Up to `width` requests in flight on the backend's loop thread. `poll` blocks until at least
    one has finished and returns every one that has; a key released while in flight is
    cancelled and never comes back.

    A request that failed for good comes back as a Completion with `error`. When OUTAGE_LIMIT
    (3) of them in a row failed for connection reasons (refused, DNS, reset, timeout: no reply
    from the server at all), with no request in between that got any reply, the poll that
    returns the last of them still returns what finished; from then on `submit`, and `poll`
    with requests in flight, raise BackendError ("… every request failed: <reason>; stopping
    (is the server up?)"). Three whatever the width: each of them already failed its whole
    retry schedule, so three in a row is a server that is down, not a blip, and even at width 1
    the run stops after three requests' retries.

    With `on_text`, requests are streamed: the loop thread queues each request's text as it
    grows, and `poll` hands it to `on_text` on the caller's thread while it waits."""

    def __init__(self, backend: OpenAIBackend, params: SamplingParams, width: int,
                 outage_limit: int = OUTAGE_LIMIT, on_text: TextCallback | None = None):
        self.backend, self.params, self.on_text = backend, params, on_text
        self.width = max(1, int(width))

        async def make_semaphore():
            return asyncio.Semaphore(self.width)

        self._semaphore = backend._call(make_semaphore())
        self._results: queue.Queue = queue.Queue()
        self._pending: dict[str, tuple[int, concurrent.futures.Future]] = {}
        self._tickets = itertools.count()
        self._lock = threading.Lock()
        self._outage = Outage(outage_limit)
        self._stopped: str | None = None

    def submit(self, request: Request) -> None:
        if self._stopped:
            raise BackendError(self._stopped)
        ticket = next(self._tickets)
        with self._lock:
            if request.key in self._pending:
                raise BackendError(f"request '{request.key}' is already in flight")
            future = self.backend._schedule(self._run(ticket, request))
            self._pending[request.key] = (ticket, future)

    async def _run(self, ticket: int, request: Request) -> None:
        failure: Failed | None = None
        shown = None
        if self.on_text is not None:
            def shown(text: str) -> None:
                self._results.put(("text", ticket, request.key, text))
        try:
            async with self._semaphore:
                completion = await self.backend._complete(request, request.params or self.params, shown)
        except asyncio.CancelledError:
            raise                      # released, or the backend closed: nobody waits for it
        except Failed as exc:
            failure, completion = exc, _error(exc.error)
        except Exception as exc:  # noqa: BLE001 -- a bug here must not leave poll waiting forever
            error = self.backend._scrub(f"{type(exc).__name__}: {one_line(exc)}")
            log.debug("%s: request %s failed: %s", self.backend.model_name, request.key, error)
            failure, completion = Failed(error), _error(error)
        self._results.put(("done", ticket, request.key, completion, failure))

    def poll(self) -> list[tuple[str, Completion]]:
        with self._lock:
            idle = not self._pending
        if self._stopped and not idle:
            raise BackendError(self._stopped)
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
                self._take(item, finished)
                try:
                    item = self._results.get_nowait()
                except queue.Empty:
                    break

    def _take(self, item, finished: list) -> None:
        if item[0] == "text":
            _, ticket, key, text = item
            with self._lock:
                current = key in self._pending and self._pending[key][0] == ticket
            if current:
                self.on_text(key, text)
            return
        _, ticket, key, completion, failure = item
        with self._lock:
            current = key in self._pending and self._pending[key][0] == ticket
            if current:
                del self._pending[key]
        if not current:
            return                     # released while in flight: nobody waits for it
        if self.on_text is not None and completion.error is None:
            self.on_text(key, completion.text)
        finished.append((key, completion))
        reason = self._outage.record(failure)
        if reason and not self._stopped:
            count = self._outage.count
            self._stopped = (f"{self.backend.root}: every request failed ({count} in a row): {reason}; "
                             "stopping (is the server up?)")
            log.debug("%s", self._stopped)

    def release(self, key: str) -> None:
        with self._lock:
            entry = self._pending.pop(key, None)
        if entry is not None:
            entry[1].cancel()
