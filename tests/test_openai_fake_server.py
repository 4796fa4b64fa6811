"""The remote backend against a fake OpenAI-compatible server (tests/fault_proxy.py FakeOpenAI):
the check at construction, replies without text, the stop when every request fails for want
of a server, and the width it takes when none is named."""

from __future__ import annotations

import socket
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")

from fault_proxy import DROP, FakeOpenAI, chat_reply  # noqa: E402

from cai.backends.base import Request, SamplingParams  # noqa: E402
from cai.backends.openai import OpenAIBackend  # noqa: E402
from cai.errors import BackendError, OptionError  # noqa: E402

GREEDY = SamplingParams(max_new_tokens=8, temperature=0)
OK = (200, chat_reply("Fine, thanks."))


def conversation(i: int = 0) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"question {i}"}]


def backend(url: str, model: str = "fake", **kwargs) -> OpenAIBackend:
    kwargs.setdefault("api_key_env", "CAI_TEST_NO_SUCH_KEY")
    kwargs.setdefault("backoff", 0.01)
    kwargs.setdefault("timeout", 10.0)
    return OpenAIBackend(url, model, **kwargs)


def refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def run_all(stream, requests) -> dict:
    for request in requests:
        stream.submit(request)
    results = {}
    while finished := stream.poll():
        results.update(finished)
    return results


# ---- the check at construction ----

def test_a_server_that_lists_the_model_is_asked_once():
    fake = FakeOpenAI(lambda body, n: OK, models=["other", "fake"])
    with fake as url, backend(url) as b:
        assert fake.gets == 1 and fake.bodies == []
        assert b.generate([conversation()], GREEDY)[0].text == "Fine, thanks."


@pytest.mark.parametrize("models", [404, 405, ["an-alias-of-fake"]])
def test_without_a_listing_one_token_is_asked_for(models):
    fake = FakeOpenAI(lambda body, n: OK, models=models)
    with fake as url, backend(url):
        assert fake.gets == 1
        assert fake.bodies == [{"model": "fake", "messages": [{"role": "user", "content": "Hi"}],
                                "max_tokens": 1, "temperature": 0}]


def test_a_refused_connection_fails_within_seconds_naming_the_url():
    url = refused_url()
    start = time.monotonic()
    with pytest.raises(BackendError) as caught:
        backend(url, max_retries=5, timeout=120)
    assert time.monotonic() - start < 5
    message = str(caught.value)
    assert message.startswith(f"{url}: cannot reach the server: ConnectError") and "\n" not in message
    assert "is it up" in message


def test_an_unresolvable_host_fails_naming_the_url():
    with pytest.raises(BackendError, match=r"^http://no-such-host\.invalid:8000/v1: cannot reach the server"):
        backend("http://no-such-host.invalid:8000/v1")


def test_a_server_that_takes_the_connection_but_never_answers_fails_within_the_short_timeout():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    try:
        start = time.monotonic()
        with pytest.raises(BackendError, match="did not answer GET /models within 0.5s"):
            backend(url, timeout=0.5)
        assert time.monotonic() - start < 5
    finally:
        listener.close()


@pytest.mark.parametrize("status, detail", [
    (404, {"error": {"message": "The model `fake` does not exist.", "type": "NotFoundError"}}),       # vLLM
    (400, {"detail": "Server is pinned to '/models/tiny'; requested 'fake'."}),                     # transformers serve
    (400, {"error": {"message": "model 'fake' not found"}}),                                        # Ollama
])
def test_an_unknown_model_fails_naming_the_url_and_the_model(status, detail):
    fake = FakeOpenAI(lambda body, n: (status, detail), models=["served-model"])
    with fake, pytest.raises(BackendError) as caught:
        backend(fake.url)
    message = str(caught.value)
    assert message.startswith(f"{fake.url}: the server does not serve the model 'fake' (HTTP {status}: ")
    assert message.endswith("; it serves 'served-model'") and "\n" not in message
    assert len(fake.bodies) == 1


def test_an_unknown_model_without_a_listing_is_recognized_by_the_error():
    fake = FakeOpenAI(lambda body, n: (404, {"error": {"message": "The model `fake` does not exist."}}), models=405)
    with fake, pytest.raises(BackendError, match=r"does not serve the model 'fake' \(HTTP 404: The model `fake`"):
        backend(fake.url)


def test_a_wrong_api_root_is_named():
    fake = FakeOpenAI(lambda body, n: (404, {"detail": "Not Found"}), models=404)
    with fake, pytest.raises(BackendError, match="HTTP 404 for both /models and /chat/completions .*API root"):
        backend(fake.url)


def test_a_refused_key_is_named_but_never_shown(monkeypatch):
    monkeypatch.setenv("CAI_TEST_KEY", "sk-secret-123")
    fake = FakeOpenAI(lambda body, n: OK, models=401)
    with fake, pytest.raises(BackendError) as caught:
        backend(fake.url, api_key_env="CAI_TEST_KEY")
    assert "refused the API key (HTTP 401" in str(caught.value) and "$CAI_TEST_KEY" in str(caught.value)
    assert "sk-secret-123" not in str(caught.value)


def test_a_busy_or_failing_server_is_not_refused_at_construction():
    fake = FakeOpenAI(lambda body, n: (503, "busy") if n == 0 else OK, models=500)
    with fake as url, backend(url) as b:
        assert b.generate([conversation()], GREEDY)[0].text == "Fine, thanks."


def test_check_false_skips_the_check():
    with backend(refused_url(), check=False) as b:
        assert b.model_name == "fake"


def test_a_failed_check_leaves_no_thread_behind():
    before = {t.ident for t in threading.enumerate()}
    with pytest.raises(BackendError):
        backend(refused_url())
    time.sleep(0.1)
    assert not [t for t in threading.enumerate() if t.name == "cai-openai" and t.ident not in before]


# ---- replies without text ----

@pytest.mark.parametrize("empty", [chat_reply(None), {"choices": []}, {"object": "chat.completion"},
                                   {"choices": [{"index": 0, "finish_reason": "stop"}]}])
def test_a_reply_without_text_is_retried(empty):
    fake = FakeOpenAI(lambda body, n: (200, empty) if n == 0 else OK, models=["fake"])
    with fake as url, backend(url) as b:
        completion = run_all(b.stream(GREEDY, 1), [Request("a", conversation())])["a"]
    assert completion.error is None and completion.text == "Fine, thanks."
    assert len(fake.bodies) == 2


def test_a_reply_that_never_has_text_comes_back_as_an_error_not_an_empty_record():
    fake = FakeOpenAI(lambda body, n: (200, chat_reply(None, reasoning_content="  ")), models=["fake"])
    with fake as url, backend(url, max_retries=2) as b:
        completion = run_all(b.stream(GREEDY, 1), [Request("a", conversation())])["a"]
        assert completion.finish_reason == "error" and completion.text == ""
        assert completion.error == "the reply has no text (content is null) after 3 attempts"
        assert len(fake.bodies) == 3
        with pytest.raises(BackendError, match=r"request 1 of 1 failed: the reply has no text \(content is null\)"):
            b.generate([conversation()], GREEDY)


# ---- every request failing for want of a server ----

def test_three_connection_failures_in_a_row_stop_the_stream():
    with backend(refused_url(), check=False, max_retries=1) as b:
        stream = b.stream(GREEDY, 4)
        for i in range(10):
            stream.submit(Request(f"c{i}", conversation(i)))
        returned = []
        with pytest.raises(BackendError) as caught:
            while finished := stream.poll():
                returned += finished
        assert 3 <= len(returned) < 10                  # the failures it counted come back; the rest do not
        assert all(c.error and "ConnectError" in c.error for _, c in returned)
    message = str(caught.value)
    assert message.startswith(f"{b.root}: every request failed (3 in a row): ConnectError")
    assert message.endswith("after 2 attempts; stopping (is the server up?)") and "\n" not in message


def test_a_reply_in_between_resets_the_count():
    # POSTs 0, 1 dropped; 2 answered; 3, 4 dropped; 5 a 400 (the server is up); 6, 7 dropped; the rest answered
    fates = {0: DROP, 1: DROP, 3: DROP, 4: DROP, 5: (400, {"error": {"message": "bad prompt"}}), 6: DROP, 7: DROP}
    fake = FakeOpenAI(lambda body, n: fates.get(n, OK), models=["fake"])
    with fake as url, backend(url, max_retries=0) as b:
        stream = b.stream(GREEDY, 1)                    # one at a time: the fates come in this order
        results = {}
        for i in range(10):
            results.update(run_all(stream, [Request(f"c{i}", conversation(i))]))
    errors = [results[f"c{i}"].error for i in range(10)]
    assert [e is None for e in errors] == [False, False, True, False, False, False, False, False, True, True]
    assert "RemoteProtocolError" in errors[0] and errors[5].startswith("HTTP 400: bad prompt")


def test_failures_the_server_answered_never_stop_the_stream():
    fake = FakeOpenAI(lambda body, n: (500, {"error": {"message": "overloaded"}}), models=["fake"])
    with fake as url, backend(url, max_retries=0) as b:
        results = run_all(b.stream(GREEDY, 2), [Request(f"c{i}", conversation(i)) for i in range(6)])
    assert len(results) == 6 and all(c.error == "HTTP 500 after 1 attempt" for c in results.values())


# ---- the width ----

def test_concurrency_is_the_default_width():
    gate = threading.Event()

    def respond(body, n):
        gate.wait(0.3)
        return 200, chat_reply("x")

    fake = FakeOpenAI(respond, models=["fake"])
    with fake as url, backend(url, concurrency=3) as b:
        assert b.default_width() == 3
        assert len(b.generate([conversation(i) for i in range(9)], GREEDY)) == 9
        assert fake.max_in_flight == 3
    with pytest.raises(OptionError, match="concurrency: must be at least 1"):
        backend(url, concurrency=0, check=False)
    with backend(refused_url(), check=False) as b:
        assert b.default_width() == 16


def test_cai_generate_stops_when_the_server_goes_away(tmp_path):
    from typer.testing import CliRunner

    from cai.cli import app
    from conftest import ROOT, plumbing

    fake = FakeOpenAI(lambda body, n: DROP, models=["fake"])      # answers the check, then never again
    with fake as url:
        result = CliRunner().invoke(app, plumbing([
            "generate", ROOT / "examples" / "prompts.jsonl", "--backend", "openai", "--base-url", url,
            "--model", "fake", "-o", tmp_path / "pairs.jsonl", "--max-retries", "0", "--concurrency", "1",
            "--max-new-tokens", "4"]))
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{url}: every request failed (3 in a row): RemoteProtocolError" in text
    assert "stopping (is the server up?)" in text
    assert len(fake.bodies) == 3                  # not all 8 prompts: none after the third


# ---- issue 31: the base URL's query and user info, and --api-key-env ----

def _generate(url: str, tmp_path, *extra, env: dict | None = None):
    from typer.testing import CliRunner

    from cai.cli import app
    from conftest import ROOT, plumbing

    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "pairs.jsonl"
    result = CliRunner().invoke(app, plumbing([
        "generate", ROOT / "examples" / "prompts.jsonl", "--backend", "openai", "--base-url", url, "--model", "fake",
        "-o", out, "--limit", "1", "--max-new-tokens", "4", "--max-retries", "0", *extra]),
        env={"OPENAI_API_KEY": None, **(env or {})})
    return result, out


def test_a_query_in_the_base_url_is_kept_on_every_request_after_the_path(tmp_path):
    """Azure-style roots (`…/v1?api-version=1`): the path joins the URL's path, the query stays."""
    fake = FakeOpenAI(lambda body, n: OK, models=404)          # no listing: the check asks for a token too
    with fake as url:
        result, out = _generate(url + "?api-version=2024-06-01", tmp_path)
        with backend(url + "/chat/completions?api-version=2024-06-01") as b:
            b.generate([conversation()], GREEDY)
    assert result.exit_code == 0, result.output
    assert out.read_text().count("\n") == 1
    paths = [path for _, path, _ in fake.requests]
    assert paths[:2] == ["/v1/models?api-version=2024-06-01", "/v1/chat/completions?api-version=2024-06-01"]
    assert len(paths) >= 5 and set(paths[1:]) - {"/v1/models?api-version=2024-06-01"} == {
        "/v1/chat/completions?api-version=2024-06-01"}


def test_user_info_in_the_base_url_is_sent_as_basic_auth_and_never_shown(tmp_path):
    import base64

    fake = FakeOpenAI(lambda body, n: OK, models=["fake"])
    with fake as url:
        secret_url = url.replace("http://", "http://alice:s3cr%40t@")
        result, out = _generate(secret_url, tmp_path)
        with backend(secret_url) as b:
            b.generate([conversation()], GREEDY)
    assert result.exit_code == 0, result.output
    basic = "Basic " + base64.b64encode(b"alice:s3cr@t").decode()
    assert fake.requests and all(auth == basic for _, _, auth in fake.requests)
    assert all(path.startswith("/v1/") for _, path, _ in fake.requests)
    assert b.root == url.replace("http://", "http://***@") and "s3cr" not in b.url
    assert f"remote model fake at {url.replace('http://', 'http://***@')}/chat/completions" in result.stderr
    for text in (result.output, out.read_text(), repr(b.endpoint)):
        assert "s3cr" not in text and "alice" not in text
    # a server that cannot be reached, and a URL that is not one, are named without the password
    for bad in (refused_url().replace("http://", "http://alice:s3cr%40t@"), "http://alice:s3cret@"):
        result, _ = _generate(bad, tmp_path / "x")
        assert result.exit_code in (1, 2) and "Traceback" not in result.output, result.output
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "***@" in errors[0] and "s3cr" not in result.output and "alice" not in result.output


@pytest.mark.parametrize("value, said", [(None, "is not set"), ("  ", "is empty")])
def test_an_api_key_variable_that_is_named_but_unset_is_one_line_before_any_request(tmp_path, value, said):
    fake = FakeOpenAI(lambda body, n: OK, models=["fake"])
    with fake as url:
        result, out = _generate(url, tmp_path, "--api-key-env", "CAI_TEST_KEY_31", env={"CAI_TEST_KEY_31": value})
        assert result.exit_code == 2, result.output
        assert result.stderr.strip() == f"error: --api-key-env: the environment variable CAI_TEST_KEY_31 {said}"
        assert fake.requests == [] and not out.exists()
        # named and set: sent; not named: OPENAI_API_KEY when set, else no key, as before
        result, _ = _generate(url, tmp_path / "a", "--api-key-env", "CAI_TEST_KEY_31", env={"CAI_TEST_KEY_31": "k31"})
        assert result.exit_code == 0, result.output
        assert {auth for _, _, auth in fake.requests} == {"Bearer k31"}
        fake.requests.clear()
        result, _ = _generate(url, tmp_path / "b")
        assert result.exit_code == 0, result.output
        assert {auth for _, _, auth in fake.requests} == {None}
    with pytest.raises(OptionError, match="api_key_env: the environment variable CAI_TEST_KEY_31 is not set"):
        from cai.options import BackendSpec

        BackendSpec(backend="openai", base_url=url, model="fake", api_key_env="CAI_TEST_KEY_31").check()
