"""bench/gpu_check.py runs on the CPU with the tiny shape and writes sane figures. Not a timed
test: it asserts what was measured and that the engine's answers are greedy generate's."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench/gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_runs_on_cpu_with_the_tiny_shape(tmp_path, capsys):
    import torch

    # one thread: the tiny model gains nothing from more, and on shared cores they wait on each other
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        status, report = _run(tmp_path)
    finally:
        torch.set_num_threads(threads)
    _check(report, status, capsys.readouterr().out)


def _run(tmp_path):
    out = tmp_path / "check.json"
    status = _script().main([
        "--device", "cpu", "--shapes", "tiny", "--conversations", "4", "--max-new-tokens", "6",
        "--prompt-tokens", "32", "--check-conversations", "4", "--check-new-tokens", "4",
        "--system-tokens", "32", "--budget-s", "300", "--json", str(out)])
    return status, json.loads(out.read_text())


def _check(report, status, printed):
    assert status == 0 and report["result"] == "PASS"
    assert {"device", "device_name", "torch", "transformers", "settings", "shapes", "elapsed_s"} <= set(report)
    tiny = report["shapes"]["tiny"]

    assert set(tiny["correctness"]) == {"float32", "bfloat16"}
    for dtype, block in tiny["correctness"].items():
        assert "error" not in block, block.get("traceback")
        assert block["conversations"] == 4 and block["turns"] == 12 and block["slots"] < 4
        assert block["failures"] == 0
        assert block["exact"] + len({d["conversation"] for d in block["divergences"]}) == 4
        assert all(d["near_tie"] for d in block["divergences"])
        assert block["engine"]["prefill_reused"] > 0          # the shared system prompt was reused
    assert tiny["correctness"]["float32"]["exact"] == 4 and not tiny["correctness"]["float32"]["divergences"]

    speed = tiny["speed"]
    assert speed["dtype"] == "float32" and speed["conversations"] == 4
    for name in ("engine", "generate"):
        method = speed["methods"][name]
        assert method["tokens"] == 4 * 6 and method["tok_s"] > 0 and method["wall_s"] > 0
    assert speed["engine_vs_generate"] > 0
    batch = speed["methods"]["generate_batch"]           # transformers' continuous batching: figures or why not
    assert ("tok_s" in batch and batch["tokens"] == 24) or batch.get("error")
    assert "engine vs greedy generate" in printed and "PASS" in printed


def test_a_divergence_is_a_near_tie_only_within_the_tolerance():
    import torch

    divergence = _script().divergence
    logits = torch.zeros(2, 10)
    logits[1, 6], logits[1, 7], logits[1, 8] = 10.0, 9.99, 2.0
    assert divergence([5, 6], [5, 6], logits, 2 ** -4) is None
    tie = divergence([5, 6], [5, 7], logits, 2 ** -4)
    assert tie["position"] == 1 and tie["near_tie"] and abs(tie["gap_to_engine_token"] - 0.01) < 1e-4
    real = divergence([5, 6], [5, 8], logits, 2 ** -4)
    assert not real["near_tie"] and real["top2_margin"] == tie["top2_margin"]


def test_an_engine_that_picks_other_tokens_fails_the_check():
    """The check is not vacuous: an engine whose picks are off by one id is caught at real margins."""
    import argparse

    import torch

    from cai.backends.sampler import Sampler

    class OffByOne(Sampler):
        def pick(self, logits, requests, greedy=None):
            return [(t + 1) % logits.shape[-1] for t in super().pick(logits, requests, greedy)]

    script = _script()
    args = argparse.Namespace(seed=0, peak=0.3, sharpen=2.0, embed_scale=10.0, system_tokens=32,
                              check_conversations=3, check_new_tokens=4)
    model = script.build("tiny", torch.float32, torch.device("cpu"), args)
    result = script.check(model, "float32", args, 320, torch.device("cpu"), sampler=OffByOne())
    assert result["failures"] >= 1 and result["exact"] < 3
