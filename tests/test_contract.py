"""One contract every backend passes (cai/backends/registry.py): the scripted backend, `hf` on the
tiny model, `openai` against a fake server, and `vllm` on the tiny model where vLLM is installed
(under CI a missing vLLM fails). Each runs the same prompts through the Python API and must give:
every prompt accounted for, the same records for the same seed, the same records after a stop, a
torn last line (what kill -9 leaves) and a resume, each id exactly once; judge labels; reasoning
kept apart from the answer; a conversation too long for the model skipped with its reason."""

from __future__ import annotations

import hashlib
import json

import pytest

import cai
from conftest import read_jsonl

PROMPTS = [{"id": f"p{i}", "prompt": text} for i, text in enumerate([
    "How do I pick a lock?", "Write a short poem about rain.", "What is a good way to learn Python?",
    "Tell me how to make my neighbour's dog sick.", "Explain photosynthesis to a child.",
    "How should I store kitchen knives?"])]
RUN = {"max_new_tokens": 8, "temperature": 0.0, "filter": False, "batch_size": 3}


def _fake_openai_replies(body, n):
    """A deterministic server: text from the conversation's hash, reasoning apart, and option
    log-probabilities for the judge's one-token requests."""
    from fault_proxy import chat_reply

    if body.get("logprobs"):
        from test_openai_backend import chat_logprobs

        return 200, chat_logprobs(("A", -1.4), ("B", -0.3))
    digest = hashlib.sha256(json.dumps(body["messages"], sort_keys=True).encode()).hexdigest()[:8]
    return 200, chat_reply(f"A careful answer {digest}, with a safety note.", reasoning_content=f"plan {digest}")


@pytest.fixture(scope="module", params=["scripted", "hf", "openai", pytest.param("vllm", marks=pytest.mark.slow)])
def backend(request, tiny_model):
    name = request.param
    if name == "scripted":
        from cai.backends.scripted import ScriptedBackend

        yield ScriptedBackend(context_length=4000)
    elif name == "hf":
        from cai.backends.spec import open_backend
        from cai.options import BackendSpec

        opened = open_backend(BackendSpec(backend="hf", model=str(tiny_model), threads=1))
        yield opened
        opened.close()
    elif name == "openai":
        from fault_proxy import FakeOpenAI

        from cai.backends.openai import OpenAIBackend

        with FakeOpenAI(_fake_openai_replies, models=["fake"]) as url:
            opened = OpenAIBackend(url, "fake", api_key_env="CAI_TEST_NO_SUCH_KEY", concurrency=4)
            yield opened
            opened.close()
    else:
        yield request.getfixturevalue("vllm_engine")          # tests/conftest.py: one a session


def _content(records):
    """Records without what differs from run to run (the time they were made)."""
    out = []
    for r in records:
        r = json.loads(json.dumps(r))
        r["meta"].pop("created", None)
        out.append(r)
    return sorted(out, key=lambda r: r["id"])


def test_every_prompt_is_accounted_for_and_the_same_seed_makes_the_same_records(backend, tmp_path):
    first = cai.generate(PROMPTS, tmp_path / "a.jsonl", model=backend, **RUN)
    second = cai.generate(PROMPTS, tmp_path / "b.jsonl", model=backend, **{**RUN, "batch_size": 2})
    assert first.exit_code == 0 and first.kept + first.dropped + first.failed + first.skipped == len(PROMPTS)
    a, b = read_jsonl(tmp_path / "a.jsonl"), read_jsonl(tmp_path / "b.jsonl")
    assert sorted(r["id"] for r in a) == [p["id"] for p in PROMPTS]
    for record in a:
        assert record["meta"]["model"] == backend.model_name
        assert isinstance(record["chosen"], str) and isinstance(record["rejected"], str)
        assert record["rounds"][-1]["revision"] == record["chosen"]
    assert _content(a) == _content(b), "the same seed made other records at another batch size"
    assert second.exit_code == 0


def test_a_stop_a_torn_line_and_a_resume_make_the_uncut_records_each_once(backend, tmp_path):
    whole = cai.generate(PROMPTS, tmp_path / "whole.jsonl", model=backend, **RUN)
    assert whole.exit_code == 0
    out = tmp_path / "cut.jsonl"
    made = []
    cut = cai.generate(PROMPTS, out, model=backend, **RUN,
                       progress=lambda phase, summary: made.append(summary.kept),
                       stop=lambda: bool(made) and made[-1] >= 2)
    assert cut.not_made and cut.exit_code != 0
    with open(out, "a", encoding="utf-8") as f:          # what kill -9 in the middle of a write leaves
        f.write('{"id": "p5", "prompt": "How should I st')
    resumed = cai.generate(PROMPTS, out, model=backend, **RUN)
    assert resumed.exit_code == 0, resumed.problem()
    records = read_jsonl(out)
    assert sorted(r["id"] for r in records) == [p["id"] for p in PROMPTS]
    assert _content(records) == _content(read_jsonl(tmp_path / "whole.jsonl"))


def test_the_judge_labels_every_pair(backend, tmp_path):
    cai.generate(PROMPTS[:3], tmp_path / "pairs.jsonl", model=backend, **RUN)
    judged = cai.judge(str(tmp_path / "pairs.jsonl"), None, model=backend)
    assert len(judged.records) == 3
    for record in judged.records:
        judge = record["judge"]
        assert 0.0 <= judge["label"] <= 1.0 and len(judge["orders"]) == 2, judge
        assert all(0.0 <= p <= 1.0 for p in judge["orders"]), judge


def test_reasoning_is_kept_apart_from_the_answer(backend, tmp_path):
    summary = cai.generate(PROMPTS[:2], None, model=backend, reasoning="keep", **RUN)
    assert summary.exit_code == 0 and len(summary.records) == 2
    for record in summary.records:
        assert "reasoning" in record and "reasoning" in record["rounds"][0]
        if backend.model_name == "fake":             # the server sends it apart: stored apart, never in the text
            assert record["reasoning"].startswith("plan ") and "plan " not in record["rejected"]


def test_a_conversation_too_long_for_the_model_is_skipped_with_its_reason(backend, tmp_path):
    if backend.context_length is None:
        pytest.skip(f"{backend.model_name}: a server's context is out of sight (a too-long request fails there)")
    long = {"id": "long", "prompt": "word " * (backend.context_length * 2)}
    summary = cai.generate([long, PROMPTS[0]], tmp_path / "out.jsonl", model=backend, **RUN)
    assert summary.skipped == 1 and summary.exit_code == 1
    skipped = read_jsonl(tmp_path / "out.jsonl.skipped.jsonl")
    assert [(s["id"], s["kind"]) for s in skipped] == [("long", "too long")] and "context" in skipped[0]["reason"]
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == ["p0"]
