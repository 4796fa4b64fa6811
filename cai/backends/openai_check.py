"""The check an OpenAIBackend makes when it is built: does the server answer, and does it serve
the model? One `GET {root}/models`; when that listing is unavailable (404/405, an error) or does
not list the model, one chat completion of one token. Every failure is a BackendError of one
line naming the URL, raised within seconds (a short timeout, and at most a couple of quick
retries of a connection error that came at once). With several endpoints each is asked, at
once; one that cannot be reached (`Unreachable`) is named, or with `allow_down` starts taken out."""

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


class Unreachable(BackendError):
    """No answer from the server at all (refused, DNS, a timeout): it may be down for now."""


async def check_fleet(backend: OpenAIBackend, timeout: float, retries: int, allow_down: bool = False) -> None:
    """Check every endpoint of `backend` at once. One that does not serve the model (or refuses
    the key) is a BackendError whatever `allow_down` says; one that cannot be reached is, unless
    `allow_down` and another answers: it then starts taken out, probed until it answers."""
    members = backend.fleet.members
    results = await asyncio.gather(*(preflight(backend, m.endpoint, timeout, retries) for m in members),
                                   return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, BackendError):
            raise result
    failed = [(m, r) for m, r in zip(members, results) if isinstance(r, BackendError)]
    if not failed:
        return
    several = len(members) > 1
    wrong = [(m, r) for m, r in failed if not isinstance(r, Unreachable)]
    if wrong or not allow_down or len(failed) == len(members):
        member, error = (wrong or failed)[0]
        more = len(failed) - 1
        hint = ""
        if several and not wrong and len(failed) < len(members):
            hint = "; with `allow_down` the run starts without it"
        raise BackendError(f"{error}" + (f" (and {more} more of the {len(members)} endpoints failed the check)"
                                         if more else "") + hint) from None
    for member, error in failed:
        backend.fleet.take_out(member, f"did not answer the check: {error}")


async def _request(backend: OpenAIBackend, endpoint, method: str, url: str, body: dict | None, timeout: float,
                   retries: int):
    """One request with the check's short timeout; connection errors that came at once are
    retried `retries` times. Raises _Timeout, or Unreachable when the server cannot be reached."""
    import httpx

    root = endpoint.shown()
    for attempt in range(retries + 1):
        try:
            return await asyncio.wait_for(
                backend._client.request(method, url, json=body, headers=backend._headers, timeout=timeout,
                                        auth=endpoint.auth),
                timeout + 1)
        except (asyncio.TimeoutError, httpx.RequestError, httpx.InvalidURL) as exc:
            failure = from_transport_error(exc, timeout, root)
            if isinstance(failure, Fatal):
                raise BackendError(backend._scrub(failure.reason)) from None
            if isinstance(exc, httpx.ConnectTimeout):
                raise Unreachable(f"{root}: cannot connect within {timeout:g}s "
                                  "(is the server up, and is this its address?)") from None
            if isinstance(exc, (asyncio.TimeoutError, httpx.TimeoutException)):
                raise _Timeout() from None
            if attempt == retries:
                raise Unreachable(backend._scrub(f"{root}: cannot reach the server: {failure.reason} "
                                                 "(is it up, and is this its address?)")) from None
            await asyncio.sleep(QUICK_WAIT * 2 ** attempt)


def _key_refused(backend: OpenAIBackend, root: str, response) -> BackendError:
    detail = wire.error_detail(response)
    where = f"${backend._api_key_env}" if backend._api_key else f"no key (${backend._api_key_env} is not set)"
    return BackendError(backend._scrub(f"{root}: the server refused the API key "
                                       f"(HTTP {response.status_code}: {detail}); cai sent {where}"))


async def preflight(backend: OpenAIBackend, endpoint, timeout: float, retries: int) -> None:
    """Raises BackendError unless the server at `endpoint` answers and serves `backend.model_name`."""
    model, root = backend.model_name, endpoint.shown()
    try:
        listing = await _request(backend, endpoint, "GET", endpoint.url("/models"), None, timeout, retries)
    except _Timeout:
        raise Unreachable(f"{root}: the server took the connection but did not answer GET /models "
                          f"within {timeout:g}s (is it overloaded or stuck?)") from None
    if listing.status_code in (401, 403):
        raise _key_refused(backend, root, listing)
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
        reply = await _request(backend, endpoint, "POST", endpoint.url("/chat/completions"), wire.probe_body(model),
                               timeout, retries)
    except _Timeout:
        log.warning("%s: no answer to a one-token test request within %gs; going on", root, timeout)
        return
    status = reply.status_code
    if 200 <= status < 300:
        return
    if status in (401, 403):
        raise _key_refused(backend, root, reply)
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
