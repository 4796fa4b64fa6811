"""Several endpoints from one run (cai.backends.fleet through the OpenAI backend): least
outstanding, each endpoint's own limit, an endpoint that dies taken out and its requests sent to
the others (every id exactly once), all of them down (one line, exit 1, nothing lost), the check
of every endpoint before the run, and `--base-urls FILE`."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from typer.testing import CliRunner

from cai.cli import app
from conftest import plumbing, read_jsonl
from fault_proxy import DROP, FakeOpenAI, chat_reply

PROMPTS = [f"Question number {i}: how do I make tea?" for i in range(16)]


def run(*args):
    return CliRunner().invoke(app, plumbing(args))


def prompts_file(tmp_path, prompts=PROMPTS):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i:02d}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    return path


def answer(body) -> str:
    last = body["messages"][-1]["content"]
    if "improved" in last or "Rewrite" in last:
        return "A careful answer: warm the pot, steep the leaves, and mind the hot water."
    if "critique" in last.lower():
        return "It skips a warning about the hot water."
    return "Boil water and pour it."


def healthy(body, n):
    return 200, chat_reply(answer(body))


def slow(body, n):
    time.sleep(0.3)
    return 200, chat_reply(answer(body))


def refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


class Dying:
    """A server that answers `answers` requests, then dies: the requests it holds and every later
    connection fail (its socket closed)."""

    def __init__(self, answers: int, model: str = "fake"):
        self.answers, self.lock = answers, threading.Lock()
        self.fake = FakeOpenAI(self.respond, models=[model])

    def respond(self, body, n):
        if n < self.answers:
            return 200, chat_reply(answer(body))
        with self.lock:
            if self.fake is not None:
                fake, self.fake = self.fake, None
                threading.Thread(target=fake.__exit__, args=(None, None, None), daemon=True).start()
        return DROP


def test_one_endpoint_killed_one_slow_one_healthy_every_id_once(tmp_path):
    dying = Dying(answers=4)
    prompts = prompts_file(tmp_path)
    out = tmp_path / "pairs.jsonl"
    with FakeOpenAI(healthy, models=["fake"]) as ok, FakeOpenAI(slow, models=["fake"]) as late:
        gone = dying.fake.__enter__()
        result = run("generate", prompts, "--backend", "openai", "--model", "fake", "--base-url", ok,
                     "--base-url", late, "--base-url", gone, "--concurrency", "2", "-o", out, "--max-retries", "2")
    assert result.exit_code == 0, result.output
    records = read_jsonl(out)
    assert sorted(r["id"] for r in records) == [f"p{i:02d}" for i in range(16)]
    assert all(r["chosen"].startswith("A careful answer") for r in records)
    stderr = " ".join(result.stderr.split())
    assert f"endpoint {gone} taken out" in stderr
    for url in (ok, late, gone):                          # the summary has a row for each
        assert f"endpoint {url}" in stderr
    assert not (tmp_path / "pairs.jsonl.failures.jsonl").exists()
    # the manifest keeps each endpoint's figures: the dead one's errors, the slow one's latency
    [start, end] = read_jsonl(f"{out}.runs.jsonl")
    assert (start["event"], start["planned"], end["event"], end["finished"]) == ("start", 16, "end", True)
    figures = {e["url"]: e for e in end["endpoints"]}
    assert figures[gone]["errors"] >= 3 and figures[gone]["down"] and figures[gone]["taken_out"] == 1
    assert figures[ok]["errors"] == figures[late]["errors"] == 0
    assert figures[late]["median_latency"] > figures[ok]["median_latency"]
    assert sum(e["requests"] - e["errors"] for e in end["endpoints"]) == 16 * 3      # every turn answered once


def test_least_outstanding_and_each_endpoints_own_limit(tmp_path):
    """--base-urls FILE gives each endpoint its own limit; none ever holds more than that, and the
    requests spread over both."""
    a = FakeOpenAI(slow, models=["fake"])
    b = FakeOpenAI(slow, models=["fake"])
    with a as url_a, b as url_b:
        urls = tmp_path / "urls.txt"
        urls.write_text(f"# two replicas\n{url_a} 1\n\n{url_b} 3   # the bigger one\n")
        out = tmp_path / "pairs.jsonl"
        result = run("generate", prompts_file(tmp_path, PROMPTS[:8]), "--backend", "openai", "--model", "fake",
                     "--base-urls", urls, "-o", out)
    assert result.exit_code == 0, result.output
    assert len(read_jsonl(out)) == 8
    assert a.max_in_flight == 1 and 1 < b.max_in_flight <= 3
    assert len(b.bodies) > len(a.bodies) > 0


def test_every_endpoint_down_is_one_line_exit_1_and_nothing_lost(tmp_path):
    first, second = Dying(answers=5), Dying(answers=5)
    prompts = prompts_file(tmp_path)
    out = tmp_path / "pairs.jsonl"
    url_1, url_2 = first.fake.__enter__(), second.fake.__enter__()
    result = run("generate", prompts, "--backend", "openai", "--model", "fake", "--base-url", url_1,
                 "--base-url", url_2, "--concurrency", "1", "-o", out, "--max-retries", "1")
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no endpoint is up" in errors[0], result.stderr
    assert url_1 in errors[0] and url_2 in errors[0]
    made = read_jsonl(out)                   # whole lines only
    # nothing lost: the same command against a live server makes exactly the rest
    with FakeOpenAI(healthy, models=["fake"]) as ok:
        again = run("generate", prompts, "--backend", "openai", "--model", "fake", "--base-url", ok, "-o", out)
    assert again.exit_code == 0, again.output
    assert sorted(r["id"] for r in read_jsonl(out)) == [f"p{i:02d}" for i in range(16)]
    assert len(read_jsonl(out)) - len(made) == 16 - len(made)


def test_the_check_asks_every_endpoint_and_allow_down_starts_without_one(tmp_path):
    prompts = prompts_file(tmp_path, PROMPTS[:4])
    dead = refused_url()
    def other_model(body, n):
        return 404, {"error": {"message": f"The model `{body['model']}` does not exist."}}

    with FakeOpenAI(healthy, models=["fake"]) as ok, FakeOpenAI(other_model, models=["other"]) as wrong:
        refused = run("generate", prompts, "--backend", "openai", "--model", "fake", "--base-url", ok,
                      "--base-url", dead, "-o", tmp_path / "a.jsonl")
        assert refused.exit_code == 1, refused.output
        [error] = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
        assert f"{dead}: cannot reach the server" in error and "with --allow-down the run starts without it" in error
        assert not (tmp_path / "a.jsonl").exists()
        # a server that does not serve the model is never "down": --allow-down does not hide it
        served = run("generate", prompts, "--backend", "openai", "--model", "fake", "--base-url", ok,
                     "--base-url", wrong, "--allow-down", "-o", tmp_path / "b.jsonl")
        assert served.exit_code == 1 and "does not serve the model 'fake'" in served.stderr
        started = run("generate", prompts, "--backend", "openai", "--model", "fake", "--base-url", ok,
                      "--base-url", dead, "--allow-down", "-o", tmp_path / "c.jsonl")
    assert started.exit_code == 0, started.output
    assert len(read_jsonl(tmp_path / "c.jsonl")) == 4
    assert f"endpoint {dead} taken out (did not answer the check" in " ".join(started.stderr.split())


@pytest.mark.parametrize("content, message", [
    ("http://127.0.0.1:9/v1 many\n", "urls.txt:1: expected URL [CONCURRENCY] (got 'http://127.0.0.1:9/v1 many')"),
    ("\n# none\n", "urls.txt: holds no URL"),
    ("ftp://host/v1\n", "urls.txt:1: "),
    ("http://127.0.0.1:9/v1\nhttp://127.0.0.1:9/v1/\n", "--base-url: http://127.0.0.1:9/v1 is given twice"),
])
def test_a_bad_urls_file_is_one_line_naming_its_line(tmp_path, content, message):
    urls = tmp_path / "urls.txt"
    urls.write_text(content)
    result = run("generate", prompts_file(tmp_path, PROMPTS[:2]), "--backend", "openai", "--model", "fake",
                 "--base-urls", urls, "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 2, result.output
    [error] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert message in error and "Traceback" not in result.output
