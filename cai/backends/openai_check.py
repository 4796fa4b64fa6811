"""The check an OpenAIBackend makes when it is built: does the server answer, and does it serve
the model? One `GET {root}/models`; when that listing is unavailable (404/405, an error) or does
not list the model, one chat completion of one token. Every failure is a BackendError of one
line naming the URL, raised within seconds (a short timeout, and at most a couple of quick
retries of a connection error that came at once)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from cai.backends import openai_wire as wire
from cai.backends.retry import Fatal, from_transport_error
from cai.errors import BackendError

if TYPE_CHECKING:
    from cai.backends.openai import OpenAIBackend

log = logging.getLogger("cai")

QUICK_WAIT = 0.25           # seconds before the first quick retry (doubling)


class _Timeout(Exception):
    """The server took the connection but did not answer in time."""


async def _request(backend: OpenAIBackend, method: str, url: str, body: dict | None, timeout: float, retries: int):
    """One request with the check's short timeout; connection errors that came at once are
    retried `retries` times. Raises _Timeout, or BackendError when the server cannot be reached."""
    import httpx

    for attempt in range(retries + 1):
        try:
            return await asyncio.wait_for(
                backend._client.request(method, url, json=body, headers=backend._headers, timeout=timeout),
                timeout + 1)
        except (asyncio.TimeoutError, httpx.RequestError, httpx.InvalidURL) as exc:
            failure = from_transport_error(exc, timeout, backend.root)
            if isinstance(failure, Fatal):
                raise BackendError(backend._scrub(failure.reason)) from None
            if isinstance(exc, httpx.ConnectTimeout):
                raise BackendError(f"{backend.root}: cannot connect within {timeout:g}s "
                                   "(is the server up, and is this its address?)") from None
            if isinstance(exc, (asyncio.TimeoutError, httpx.TimeoutException)):
                raise _Timeout() from None
            if attempt == retries:
                raise BackendError(backend._scrub(f"{backend.root}: cannot reach the server: {failure.reason} "
                                                  "(is it up, and is this its address?)")) from None
            await asyncio.sleep(QUICK_WAIT * 2 ** attempt)


def _key_refused(backend: OpenAIBackend, response) -> BackendError:
    detail = wire.error_detail(response)
    where = f"${backend._api_key_env}" if backend._api_key else f"no key (${backend._api_key_env} is not set)"
    return BackendError(backend._scrub(f"{backend.root}: the server refused the API key "
                                       f"(HTTP {response.status_code}: {detail}); cai sent {where}"))


async def preflight(backend: OpenAIBackend, timeout: float, retries: int) -> None:
    """Raises BackendError unless the server at `backend.root` answers and serves `backend.model_name`."""
    model, root = backend.model_name, backend.root
    try:
        listing = await _request(backend, "GET", backend.endpoint.url("/models"), None, timeout, retries)
    except _Timeout:
        raise BackendError(f"{root}: the server took the connection but did not answer GET /models "
                           f"within {timeout:g}s (is it overloaded or stuck?)") from None
    if listing.status_code in (401, 403):
        raise _key_refused(backend, listing)
    served = None
    if 200 <= listing.status_code < 300:
        try:
            served = wire.listed_models(listing.json())
        except ValueError:
            served = None
        if served is not None and model in served:
            return
    # The listing is unavailable or does not name the model (servers may take aliases): ask for one token.
    try:
        reply = await _request(backend, "POST", backend.url, wire.probe_body(model), timeout, retries)
    except _Timeout:
        log.warning("%s: no answer to a one-token test request within %gs; going on", root, timeout)
        return
    status = reply.status_code
    if 200 <= status < 300:
        return
    if status in (401, 403):
        raise _key_refused(backend, reply)
    detail = wire.error_detail(reply)
    listed = ""
    if served:
        listed = f"; it serves {', '.join(repr(m) for m in served[:5])}{' …' if len(served) > 5 else ''}"
    if status == 404 and listing.status_code == 404 and model not in detail:
        raise BackendError(f"{root}: HTTP 404 for both /models and /chat/completions "
                           "(is this the API root, such as http://host:8000/v1?)")
    refused = 400 <= status < 500 and status != 429          # a client error: the same request fails again
    if status == 404 or (refused and (served is not None or wire.says_unknown_model(detail))):
        raise BackendError(backend._scrub(f"{root}: the server does not serve the model '{model}' "
                                          f"(HTTP {status}: {detail}){listed}"))
    if refused:
        raise BackendError(backend._scrub(f"{root}: the server refused a one-token test request for "
                                          f"'{model}' (HTTP {status}: {detail})"))
    log.warning("%s: a one-token test request for '%s' got HTTP %d; going on (requests are retried)",
                root, model, status)
