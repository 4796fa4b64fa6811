"""Record formats TRL reads unmodified, `cai export`, and DPO training on what cai wrote."""

from __future__ import annotations

import importlib.util
import math

import pytest
from typer.testing import CliRunner

from cai.cli import app
from cai.records import to_format
from conftest import ROOT, plumbing, read_jsonl

EXAMPLES = ROOT / "examples" / "prompts.jsonl"


def run(*args, input=None):
    return CliRunner().invoke(app, plumbing(args), input=input)


@pytest.fixture(scope="module")
def pairs(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    out = {}
    for fmt in ("standard", "conversational"):
        path = folder / f"{fmt}.jsonl"
        result = run("generate", EXAMPLES, "--model", tiny_model, "-o", path, "--format", fmt,
                     "--max-new-tokens", "8", "--limit", "4")
        assert result.exit_code == 0, result.output
        out[fmt] = path
    return out


def test_conversational_records(pairs):
    standard, chat = read_jsonl(pairs["standard"]), read_jsonl(pairs["conversational"])
    for s, c in zip(standard, chat):
        assert c["prompt"] == [{"role": "system", "content": s["meta"]["system"]},
                               {"role": "user", "content": s["prompt"]}]
        assert c["chosen"] == [{"role": "assistant", "content": s["chosen"]}]
        assert c["rejected"] == [{"role": "assistant", "content": s["rejected"]}]
        assert c["meta"] == {**s["meta"], "created": c["meta"]["created"]} and c["rounds"] == s["rounds"]


def test_formats_round_trip_losslessly(pairs):
    for record in read_jsonl(pairs["standard"]):
        assert to_format(to_format(record, "conversational"), "standard") == record
        sft = to_format(record, "sft")
        assert sft["completion"] == record["chosen"] and "rejected" not in sft and "chosen" not in sft


def test_every_file_loads_with_datasets(pairs, tmp_path):
    datasets = pytest.importorskip("datasets")
    files = dict(pairs)
    for fmt in ("sft", "conversational"):
        target = tmp_path / f"{fmt}.jsonl"
        assert run("export", pairs["standard"], "--format", fmt, "-o", target).exit_code == 0
        files[f"export-{fmt}"] = target
    for name, path in files.items():
        data = datasets.load_dataset("json", data_files=str(path), split="train")
        assert len(data) == 4, name


def test_export_split_and_parquet(pairs, tmp_path):
    datasets = pytest.importorskip("datasets")
    target = tmp_path / "pairs.parquet"
    result = run("export", pairs["conversational"], "-o", target, "--test-size", "0.5", "--seed", "1")
    assert result.exit_code == 0, result.output
    train = datasets.Dataset.from_parquet(str(tmp_path / "pairs.train.parquet"))
    test = datasets.Dataset.from_parquet(str(tmp_path / "pairs.test.parquet"))
    assert len(train) + len(test) == 4
    assert set(train["id"]).isdisjoint(test["id"])
    again = tmp_path / "again.jsonl"
    assert run("export", pairs["standard"], "-o", again, "--test-size", "0.5", "--seed", "1").exit_code == 0
    assert [r["id"] for r in read_jsonl(tmp_path / "again.test.jsonl")] == test["id"], "split by id, not by format"


def test_export_errors(tmp_path):
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p", "chos')
    result = run("export", broken)
    assert result.exit_code == 2 and "b.jsonl:2: not a whole JSON record" in result.stderr
    broken.write_text('{"prompt": "p", "chosen": "c"}\n')
    result = run("export", broken)
    assert result.exit_code == 2 and "b.jsonl:1: rejected: missing" in result.stderr
    assert run("export", broken, "--format", "xml").exit_code == 2


def test_generate_refuses_to_mix_formats_in_one_file(tiny_model, pairs):
    result = run("generate", EXAMPLES, "--model", tiny_model, "-o", pairs["standard"], "--format", "conversational",
                 "--max-new-tokens", "8", "--limit", "5")
    assert result.exit_code == 2 and "format → conversational" in result.stderr


@pytest.mark.parametrize("fmt", ["standard", "conversational"])
def test_dpo_trainer_trains_on_cai_output(pairs, tiny_model, tmp_path, fmt):
    pytest.importorskip("trl")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.spec_from_file_location("train_dpo", ROOT / "examples" / "train_dpo.py")
    train_dpo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_dpo)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    losses = train_dpo.train(str(pairs[fmt]), model, tokenizer, str(tmp_path / "out"), max_steps=2,
                             learning_rate=1e-3)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    changed = [k for k, v in model.named_parameters() if not torch.equal(v.detach(), before[k])]
    assert changed, "training must change the weights"


@pytest.mark.slow
def test_a_real_pipe_into_the_trainer(tiny_model, tmp_path):
    """`cai generate … -o - | python examples/train_dpo.py -`: the trainer reads the pipe."""
    pytest.importorskip("trl")
    import shlex
    import subprocess
    import sys

    out = tmp_path / "dpo"
    command = (f"set -o pipefail; {shlex.quote(sys.executable)} -m cai generate {shlex.quote(str(EXAMPLES))} "
               f"--model {shlex.quote(str(tiny_model))} -o - --limit 3 --max-new-tokens 8 --no-filter -q | "
               f"{shlex.quote(sys.executable)} {shlex.quote(str(ROOT / 'examples' / 'train_dpo.py'))} - "
               f"--model {shlex.quote(str(tiny_model))} --max-steps 2 --output-dir {shlex.quote(str(out))}")
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "trained 2 logged steps" in proc.stdout
    assert (out / "config.json").exists()
