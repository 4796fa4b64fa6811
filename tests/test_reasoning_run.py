"""Reasoning models end to end: a Qwen3-style tiny model through the CLI, and a server that
returns reasoning apart (`reasoning_content`) and inline (`<think>`), through `cai generate
--backend openai`. No reasoning tag may reach chosen or rejected; under `keep` it is stored apart."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cai.cli import app
from conftest import ROOT, plumbing, read_jsonl
from fault_proxy import FakeOpenAI, chat_reply

EXAMPLES = ROOT / "examples" / "prompts.jsonl"


def run(*args):
    return CliRunner().invoke(app, plumbing(args))


def test_a_qwen3_style_model_is_told_not_to_think(thinking_model, tmp_path):
    from cai.backends.hf import HFBackend

    out = tmp_path / "pairs.jsonl"
    result = run("generate", EXAMPLES, "--model", thinking_model, "-o", out, "--max-new-tokens", "8", "-n", "3")
    assert result.exit_code == 0, result.output
    records = read_jsonl(out)
    assert len(records) == 3
    for record in records:
        assert record["meta"]["reasoning"] == "off" and "reasoning" not in record["meta"]["params"]   # auto: the default
        assert "<think>" not in record["chosen"] + record["rejected"] and "reasoning" not in record
    backend = HFBackend(str(thinking_model), "thinking")
    assert backend.thinking_switch
    backend.set_thinking(False)
    assert backend.render([{"role": "user", "content": "hi"}]).endswith("<think>\n\n</think>\n\n")
    kept = tmp_path / "kept.jsonl"
    result = run("generate", EXAMPLES, "--model", thinking_model, "-o", kept, "--max-new-tokens", "8", "-n", "2",
                 "--reasoning", "keep")
    assert result.exit_code == 0, result.output
    for record in read_jsonl(kept):
        assert record["meta"]["reasoning"] == "keep" and "reasoning" in record      # None: it wrote none
        assert "<think>" not in record["chosen"] + record["rejected"]
    # the mode is part of the run: the same output under another mode is refused, not mixed
    refused = run("generate", EXAMPLES, "--model", thinking_model, "-o", kept, "--max-new-tokens", "8", "-n", "2",
                  "--reasoning", "drop")
    assert refused.exit_code == 2 and "reasoning: 'keep' → 'drop'" in refused.stderr


def _reasoning_server(body, n):
    """Answers every request after thinking: even requests with reasoning_content apart, odd
    ones inline; the answer depends on the last user turn, so revisions differ from responses."""
    last = body["messages"][-1]["content"]
    for message in body["messages"]:
        assert "<think>" not in message["content"] and "I should think" not in message["content"], \
            "reasoning leaked into the history sent back"
    answer = ("A safer answer: keep the knife pointed away from you and cut on a board." if "improved" in last else
              "Your reply could mention safety." if "critique" in last else "Just slice it quickly with a knife.")
    thought = f"I should think about request {n}."
    if n % 2:
        return 200, chat_reply(f"<think>\n{thought}\n</think>\n\n{answer}")
    return 200, chat_reply(answer, reasoning_content=thought)


@pytest.mark.parametrize("mode", ["keep", "drop"])
def test_a_reasoning_server_gives_clean_pairs(tmp_path, mode):
    fake = FakeOpenAI(_reasoning_server, models=["reasoner"])
    out = tmp_path / "pairs.jsonl"
    with fake as url:
        result = run("generate", EXAMPLES, "--backend", "openai", "--base-url", url, "--model", "reasoner",
                     "-o", out, "-n", "3", "--reasoning", mode, "--concurrency", "2")
    assert result.exit_code == 0, result.output
    records = read_jsonl(out)
    assert len(records) == 3
    for record in records:
        for text in (record["chosen"], record["rejected"], record["critique"]):
            assert "think" not in text and "<" not in text
        assert record["rejected"] == "Just slice it quickly with a knife."
        assert record["chosen"].startswith("A safer answer")
        if mode == "keep":
            assert record["reasoning"].startswith("I should think about request")
            assert set(record["rounds"][0]["reasoning"]) == {"critique", "revision"}
            assert all(v.startswith("I should think") for v in record["rounds"][0]["reasoning"].values())
        else:
            assert "reasoning" not in record and "reasoning" not in record["rounds"][0]
    # keep and drop leave a server's template at its own default (a hosted API may refuse the field)
    assert all("chat_template_kwargs" not in body for body in fake.bodies)


def test_reasoning_off_tells_a_server(tmp_path):
    fake = FakeOpenAI(_reasoning_server, models=["reasoner"])
    with fake as url:
        result = run("generate", EXAMPLES, "--backend", "openai", "--base-url", url, "--model", "reasoner",
                     "-o", tmp_path / "p.jsonl", "-n", "2", "--reasoning", "off")
    assert result.exit_code == 0, result.output
    chats = [body for body in fake.bodies if "messages" in body and body.get("max_tokens", 2) > 1]
    assert chats and all(body["chat_template_kwargs"] == {"enable_thinking": False} for body in chats)


def _labelled_thinking_server(body, n):
    """Its critiques open with a label and think after it ("Critique: <think>…</think> …")."""
    last = body["messages"][-1]["content"]
    if "critique" in last.lower() and "improved" not in last:
        return 200, chat_reply("Critique: <think>\nThe user wants knives; I must be careful.\n</think>\n"
                               "The answer skips safety.")
    if "improved" in last:
        return 200, chat_reply("Keep the blade pointed away and cut on a board.")
    return 200, chat_reply("Just slice it quickly.")


@pytest.mark.parametrize("mode", ["keep", "drop"])
def test_reasoning_after_a_label_in_a_critique_is_taken_out(tmp_path, mode):
    """Issue 31: a critique "Critique: <think>…</think> The answer …" kept its block in `critique`
    and `rounds[].critique`, where no filter looked."""
    out = tmp_path / "pairs.jsonl"
    with FakeOpenAI(_labelled_thinking_server, models=["reasoner"]) as url:
        result = run("generate", EXAMPLES, "--backend", "openai", "--base-url", url, "--model", "reasoner",
                     "-o", out, "-n", "2", "--reasoning", mode)
    assert result.exit_code == 0, result.output
    records = read_jsonl(out)
    assert len(records) == 2
    for record in records:
        assert "<think>" not in record["critique"] and "</think>" not in record["rounds"][0]["critique"]
        assert record["critique"] == "Critique: The answer skips safety."
        if mode == "keep":
            assert record["rounds"][0]["reasoning"]["critique"] == "The user wants knives; I must be careful."


def test_the_reasoning_filter_looks_at_critiques_too():
    from cai.filters import Filters

    record = {"prompt": "p", "chosen": "Cut on a board, away from you.", "rejected": "Just slice it.",
              "critique": "Critique: <think> half", "rounds": [{"critique": "Critique: <think> half"}],
              "meta": {"finish_reasons": {"response": "stop", "revision": ["stop"]}}}
    assert Filters().apply(record).reasons == ["reasoning"]
