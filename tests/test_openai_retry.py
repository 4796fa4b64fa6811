"""The retry policy of remote requests (cai.backends.retry), without any server: which failures
are tried again, how long the waits are, Retry-After, and when a run of connection failures
means the server is gone."""

from __future__ import annotations

import asyncio
import random
import time
from email.utils import formatdate

import pytest

from cai.backends.retry import (MAX_BACKOFF, MAX_RETRY_AFTER, Failed, Fatal, Outage, Retryable, RetryPolicy,
                                from_status, from_transport_error, is_retryable_status, retry_after)

httpx = pytest.importorskip("httpx")


def run(policy: RetryPolicy, outcomes: list):
    """Run `policy` over attempts that raise or return `outcomes` in turn; (result or Failed, the
    waits it slept, the attempts made)."""
    waits, made = [], []

    async def attempt():
        made.append(1)
        outcome = outcomes[len(made) - 1]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def sleep(seconds):
        waits.append(seconds)

    async def go():
        try:
            return await policy.run(attempt, sleep=sleep)
        except Failed as failure:
            return failure

    return asyncio.run(go()), waits, len(made)


def test_transient_failures_are_retried_until_one_succeeds():
    policy = RetryPolicy(max_retries=5, backoff=0.5, rng=random.Random(0))
    result, waits, made = run(policy, [Retryable("HTTP 500"), Retryable("timeout (1s)", connection=True), "done"])
    assert result == "done" and made == 3 and len(waits) == 2


def test_a_fatal_failure_is_not_retried():
    result, waits, made = run(RetryPolicy(max_retries=5), [Fatal("HTTP 400: bad", 400), "never"])
    assert isinstance(result, Failed) and made == 1 and waits == []
    assert result.error == "HTTP 400: bad after 1 attempt" and result.status == 400 and not result.connection


def test_after_the_last_retry_the_request_fails_with_the_last_reason():
    outcomes = [Retryable("HTTP 503"), Retryable("ConnectError: refused", connection=True)]
    result, waits, made = run(RetryPolicy(max_retries=1, backoff=0.01), outcomes)
    assert isinstance(result, Failed) and made == 2 and len(waits) == 1
    assert result.error == "ConnectError: refused after 2 attempts"
    assert result.connection and result.status is None
    # the last attempt decides whether it was a connection failure
    result, _, _ = run(RetryPolicy(max_retries=1), [Retryable("x", connection=True), Retryable("HTTP 502")])
    assert not result.connection


def test_no_retries_means_one_attempt():
    result, waits, made = run(RetryPolicy(max_retries=0), [Retryable("HTTP 500"), "never"])
    assert result.error == "HTTP 500 after 1 attempt" and made == 1 and waits == []
    assert RetryPolicy(max_retries=-3).attempts == 1


def test_backoff_doubles_with_jitter_and_is_capped():
    policy = RetryPolicy(backoff=0.5, rng=random.Random(1))
    for attempt in range(1, 12):
        base = min(MAX_BACKOFF, 0.5 * 2 ** (attempt - 1))
        for _ in range(20):
            assert base / 2 <= policy.delay(attempt) <= base
    assert max(policy.delay(30) for _ in range(50)) <= MAX_BACKOFF
    assert RetryPolicy(backoff=0).delay(3) == 0


def test_a_server_requested_wait_replaces_the_backoff():
    policy = RetryPolicy(backoff=10.0)
    assert policy.delay(1, requested=0.0) == 0.0 and policy.delay(4, requested=2.5) == 2.5
    result, waits, _ = run(RetryPolicy(max_retries=2, backoff=10.0), [Retryable("HTTP 429", wait=1.5), "ok"])
    assert result == "ok" and waits == [1.5]


def test_retry_after_values():
    assert retry_after(None) is None and retry_after("") is None and retry_after("soon") is None
    assert retry_after("1") == 1.0 and retry_after("0.25") == 0.25 and retry_after("-3") == 0.0
    assert retry_after("100000") == MAX_RETRY_AFTER and retry_after("nan") is None
    assert 3 <= retry_after(formatdate(time.time() + 5, usegmt=True)) <= 5
    assert retry_after(formatdate(time.time() - 60, usegmt=True)) == 0.0


@pytest.mark.parametrize("status, retried", [(429, True), (500, True), (502, True), (503, True), (504, True),
                                             (400, False), (401, False), (404, False), (422, False)])
def test_which_statuses_are_retried(status, retried):
    assert is_retryable_status(status) is retried
    failure = from_status(status, {"retry-after": "2"}, lambda: "the detail")
    if retried:
        assert isinstance(failure, Retryable) and failure.reason == f"HTTP {status}" and failure.wait == 2.0
        assert not failure.connection            # the server answered
    else:
        assert isinstance(failure, Fatal) and failure.reason == f"HTTP {status}: the detail"
        assert failure.status == status


def test_transport_errors_are_retryable_connection_failures_and_a_bad_url_is_fatal():
    request = httpx.Request("POST", "http://127.0.0.1:1/v1/chat/completions")
    for exc, reason in [(httpx.ConnectError("All connection attempts failed", request=request),
                         "ConnectError: All connection attempts failed"),
                        (httpx.ConnectError("[Errno -2] Name or service not known", request=request),
                         "ConnectError: [Errno -2] Name or service not known"),
                        (httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request),
                         "RemoteProtocolError: Server disconnected without sending a response"),
                        (httpx.ReadTimeout("timed out", request=request), "timeout (2s)"),
                        (asyncio.TimeoutError(), "timeout (2s)")]:
        failure = from_transport_error(exc, 2.0, "http://h/v1")
        assert isinstance(failure, Retryable) and failure.connection and failure.reason == reason
    failure = from_transport_error(httpx.UnsupportedProtocol("no scheme", request=request), 2.0, "h:1/v1")
    assert isinstance(failure, Fatal) and failure.reason == "bad URL h:1/v1: no scheme"


def test_an_outage_is_three_connection_failures_in_a_row():
    connection, answered = Failed("ConnectError: refused after 6 attempts", connection=True), Failed("HTTP 400: x")
    outage = Outage()
    assert outage.record(connection) is None and outage.record(connection) is None
    assert outage.record(connection) == "ConnectError: refused after 6 attempts" and outage.down
    outage = Outage(3)
    for failure in (connection, connection, None, connection, connection, answered, connection, connection):
        assert outage.record(failure) is None      # a success, or any reply from the server, resets the count
    assert outage.count == 2 and not outage.down
    assert Outage(1).record(connection) is not None
