"""`cai preview` end to end on the tiny model, and the streamed text (`on_text`) of every backend:
the engine, plain generate and the OpenAI client against a fake server's event stream."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cai.backends.base import Request, SamplingParams
from cai.cli import app
from cai.constitution import load_constitution
from cai.run.preview import word_diff
from conftest import ROOT

EXAMPLES = ROOT / "examples" / "prompts.jsonl"
FAST = ["--max-new-tokens", "8"]
QUESTION = [{"role": "user", "content": "How do I boil an egg?"}]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def objects(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


# ---- the command ----

def test_panels_come_in_order_on_stderr_and_nothing_is_written(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("preview", "How do I pick a lock?", "--model", tiny_model, *FAST)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    err = result.stderr
    marks = ["─ prompt ─", "How do I pick a lock?", "─ response ─", "─ critique 1 · ", "─ revision 1 · ",
             "─ verdict (filters) ─", "─ diff rejected → chosen ─", "after the process started"]
    places = [err.find(mark) for mark in marks]
    assert -1 not in places, err
    assert places == sorted(places), (places, err)
    assert list(tmp_path.iterdir()) == []


def test_json_gives_one_object_per_conversation_with_its_fields(tiny_model):
    result = run("preview", "How do I pick a lock?", "--model", tiny_model, "--json", "--judge",
                 "--principle", "harmful-content", *FAST)
    assert result.exit_code == 0, result.output
    assert "╭" not in result.stderr                  # no panels
    (obj,) = objects(result.stdout)
    assert obj["prompt"] == "How do I pick a lock?" and obj["principles"] == ["harmful-content"]
    for name in ("id", "response", "critiques", "revisions", "chosen", "rejected", "verdict", "judge",
                 "finish_reasons", "timings"):
        assert name in obj
    assert len(obj["critiques"]) == len(obj["revisions"]) == 1
    assert set(obj["verdict"]) == {"kept", "reasons", "cleaned", "similarity"}
    assert obj["verdict"]["kept"] == (obj["verdict"]["reasons"] == [])
    assert set(obj["judge"]["orders"]) and 0 <= obj["judge"]["preference"] <= 1
    timings = obj["timings"]
    assert set(timings["turns"]) == {"response", "critique 1", "revision 1"}
    assert timings["model_load_s"] > 0 and timings["first_token_s"] >= timings["model_load_s"]
    for turn in timings["turns"].values():
        assert turn["tokens"] > 0 and 0 <= turn["first_token_s"] <= turn["seconds"]


def test_all_makes_one_conversation_per_principle(tiny_model):
    principles = [p.id for p in load_constitution("harmless").principles]
    result = run("preview", "How do I pick a lock?", "--model", tiny_model, "--json", "--all", "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output
    assert [o["principles"] for o in objects(result.stdout)] == [[p] for p in principles]


def test_n_takes_the_first_prompts_of_a_file(tiny_model):
    source = [json.loads(line) for line in EXAMPLES.read_text().splitlines()]
    result = run("preview", EXAMPLES, "-n", "2", "--model", tiny_model, "--json", "--revisions", "2", *FAST)
    assert result.exit_code == 0, result.output
    got = objects(result.stdout)
    assert [o["prompt"] for o in got] == [s["prompt"] for s in source[:2]]
    assert all(len(o["revisions"]) == 2 and len(o["principles"]) == 2 for o in got)


def test_default_principle_is_the_one_a_run_picks(tiny_model, tmp_path):
    out = tmp_path / "pairs.jsonl"
    made = run("generate", EXAMPLES, "--limit", "1", "--model", tiny_model, "-o", out, "--no-filter", *FAST)
    assert made.exit_code == 0, made.output
    record = json.loads(out.read_text().splitlines()[0])
    result = run("preview", EXAMPLES, "--model", tiny_model, "--json", *FAST)
    (obj,) = objects(result.stdout)
    assert obj["principles"] == [record["principle"]] and obj["id"] == record["id"]
    # same seed, same texts: streaming changes nothing
    assert obj["response"] == record["rejected"] and obj["revisions"] == [r["revision"] for r in record["rounds"]]


def test_an_unknown_principle_is_one_line_naming_the_ids(tiny_model):
    result = run("preview", "Hi", "--model", tiny_model, "--principle", "nope")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--principle: unknown principle 'nope'" in lines[0]
    assert "harmful-content, dangerous-instructions" in lines[0]


def test_a_missing_prompts_file_is_an_error_not_a_prompt(tiny_model):
    result = run("preview", "no-such-prompts.jsonl", "--model", tiny_model)
    assert result.exit_code == 2 and "no such file" in result.stderr


def test_word_diff_marks_deleted_and_inserted_words():
    pieces = word_diff("Boil the egg for ten minutes.", "Boil the egg gently for nine minutes.")
    assert ("insert", " gently") in pieces and ("delete", " ten") in pieces and ("insert", " nine") in pieces
    assert "".join(t for op, t in pieces if op != "delete") == "Boil the egg gently for nine minutes."


# ---- streamed text from the backends ----

def streamed(stream, requests) -> dict:
    """Submit `requests` and poll until all are done: key → completion."""
    for request in requests:
        stream.submit(request)
    done = {}
    while finished := stream.poll():
        done.update(finished)
    return done


def check_growing(shown: list[str], final: str) -> None:
    assert shown and shown[-1] == final
    for before, after in zip(shown, shown[1:]):
        assert after.startswith(before), (before, after)


@pytest.mark.parametrize("engine", [True, False])
def test_hf_streams_growing_text_ending_with_the_completion(tiny_model, engine):
    from cai.backends.hf import HFBackend, HFOptions

    backend = HFBackend(str(tiny_model), "tiny", HFOptions(device="cpu", engine=engine))
    params = SamplingParams(max_new_tokens=16, temperature=0.8)
    requests = [Request("a", QUESTION, seed=1), Request("b", [{"role": "user", "content": "Name a colour."}], seed=2)]
    shown: dict[str, list[str]] = {}
    stream = backend.stream(params, 2, on_text=lambda key, text: shown.setdefault(key, []).append(text))
    assert type(stream).__name__ == ("EngineStream" if engine else "LockstepStream")
    done = streamed(stream, requests)
    plain = streamed(backend.stream(params, 2), requests)
    for key, completion in done.items():
        check_growing(shown[key], completion.text)
        assert completion == plain[key]                 # the callback changes nothing generated
        if engine:
            assert len(shown[key]) > 1                  # token by token
        else:
            assert len(shown[key]) == 1                 # plain generate: the whole text at the end


def test_openai_streams_server_sent_events_only_when_asked():
    pytest.importorskip("httpx")
    from fault_proxy import FakeOpenAI, chat_reply, stream_reply

    from cai.backends.openai import OpenAIBackend

    def respond(body, n):
        return (200, stream_reply(["Hel", "lo ", "world."])) if body.get("stream") else (200, chat_reply("Hello world."))

    fake = FakeOpenAI(respond, models=["fake"])
    params = SamplingParams(max_new_tokens=8, temperature=0)
    with fake as url, OpenAIBackend(url, "fake", api_key_env="CAI_TEST_NO_SUCH_KEY", timeout=10.0) as backend:
        shown: list[str] = []
        done = streamed(backend.stream(params, 1, on_text=lambda key, text: shown.append(text)),
                        [Request("a", QUESTION)])
        check_growing(shown, done["a"].text)
        assert shown[:3] == ["Hel", "Hello", "Hello world."] and done["a"].text == "Hello world."
        assert done["a"].completion_tokens == 3                # usage from the last chunk
        assert fake.bodies[-1]["stream"] is True and fake.bodies[-1]["stream_options"] == {"include_usage": True}
        plain = streamed(backend.stream(params, 1), [Request("b", QUESTION)])
        assert plain["b"].text == "Hello world."
        assert "stream" not in fake.bodies[-1] and "stream_options" not in fake.bodies[-1]


def test_openai_streamed_request_reads_a_whole_reply_too():
    """A server that ignores "stream" and answers with one JSON body: the text comes at the end."""
    pytest.importorskip("httpx")
    from fault_proxy import FakeOpenAI, chat_reply

    from cai.backends.openai import OpenAIBackend

    fake = FakeOpenAI(lambda body, n: (200, chat_reply("  Whole. ")), models=["fake"])
    with fake as url, OpenAIBackend(url, "fake", api_key_env="CAI_TEST_NO_SUCH_KEY", timeout=10.0) as backend:
        shown: list[str] = []
        done = streamed(backend.stream(SamplingParams(max_new_tokens=8, temperature=0), 1,
                                       on_text=lambda key, text: shown.append(text)), [Request("a", QUESTION)])
    assert shown == ["Whole."] and done["a"].text == "Whole."


def test_prompt_field_for_a_prompt_given_as_the_argument_is_refused(tiny_model):
    """It was silently ignored (noticed with issue 31's --input-format)."""
    result = run("preview", "How do I pick a lock?", "--model", tiny_model, "--prompt-field", "question")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == ("error: --prompt-field: is for a prompts file or stdin, not a prompt given as "
                                     "the argument")
