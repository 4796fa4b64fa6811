"""issue 33: the two-stage recipe of docs/two-stage.md, end to end on the tiny model: stage one
(critique and revise), `cai export --to trl` and a two-step `trl dpo` run, then stage two sampling
from the trained model with a separate feedback model, exported and trained on again."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cai.cli import app
from conftest import ROOT, plumbing, read_jsonl

EXAMPLES = ROOT / "examples" / "prompts.jsonl"
CPU = ["--max_steps", "2", "--bf16", "false", "--use_cpu", "true", "--per_device_train_batch_size", "2",
       "--per_device_eval_batch_size", "1", "--gradient_accumulation_steps", "1", "--save_strategy", "no",
       "--eval_strategy", "no", "--logging_steps", "1", "--report_to", "none"]


def cli(*args):
    result = CliRunner().invoke(app, plumbing(args))
    assert result.exit_code == 0, result.output
    return result


def train(folder: Path, cwd: Path) -> Path:
    trl = shutil.which("trl", path=str(Path(sys.executable).parent))
    assert trl, "the trl command comes with the dev extra"
    proc = subprocess.run([trl, "dpo", "--config", str(folder / "trl_dpo.yaml"), *CPU], capture_output=True,
                          text=True, timeout=600, cwd=cwd,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'loss'" in proc.stdout + proc.stderr
    trained = folder / "trl-dpo-out"
    assert any(trained.glob("*.safetensors")), list(trained.iterdir())
    return trained


@pytest.mark.slow                         # two `trl dpo` runs, each another process
def test_two_stage_recipe_on_the_tiny_model(tiny_model, thinking_model, tmp_path):
    pytest.importorskip("trl")
    # stage one: supervised pairs (critique and revise) with the shipped constitution
    stage1 = tmp_path / "stage1.jsonl"
    cli("generate", EXAMPLES, "--model", tiny_model, "-o", stage1, "--max-new-tokens", "8", "--no-filter")
    assert len(read_jsonl(stage1)) == 8
    sl = tmp_path / "sl"
    cli("export", stage1, "--to", "trl", sl)
    policy = train(sl, tmp_path)
    # stage two: answers sampled from the trained policy, labelled by a separate feedback model
    stage2 = tmp_path / "stage2.jsonl"
    cli("generate", EXAMPLES, "--model", policy, "--judge-model", thinking_model, "-o", stage2, "--samples", "2",
        "--principles-per-comparison", "2", "--max-new-tokens", "8", "--temperature", "1.0", "--no-filter")
    records = read_jsonl(stage2)
    assert len(records) == 8
    for record in records:
        feedback = record["meta"]["feedback"]
        assert "trl-dpo-out" in record["meta"]["model"] and feedback["model"] != record["meta"]["model"]
        assert len(feedback["principles"]) == 2 and 0.5 <= feedback["label"] <= 1
    stats = cli("stats", stage2, "--json")
    assert '"feedback"' in stats.stdout
    rl = tmp_path / "rl"
    cli("export", stage2, "--to", "trl", rl)
    rows = read_jsonl(rl / "data" / "train.jsonl")
    assert rows and all("margin" in row for row in rows)
    train(rl, tmp_path)                       # TRL's DPOTrainer reads the soft-labelled rows
