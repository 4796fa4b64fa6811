"""A run's records are the same bytes however the run is cut: batch sizes 1, 7, 64 and 128, the
engine's drafts on or off, a run stopped partway then resumed at another batch size, and a
`cai generate` process stopped by SIGTERM then resumed. On the CPU's default arithmetic (bfloat16
on cai's kernels where the CPU has AVX512-BF16, else float16 weights and float32 sums), float16,
int8 everywhere, and bfloat16 where the CPU has bf16 units. What makes it hold is an id's logits being the same bits whatever shares its forward
(tests/test_engine.py checks that directly); this checks what a user sees, on the tiny model,
whose near-even random logits turn a last-bit difference into another token quickly."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time

import pytest

from cai.backends import quant
from cai.backends.hf import HFBackend, HFOptions

VERBS = ["fix", "paint", "explain", "cook", "hide", "sell", "build", "clean", "measure", "describe"]
THINGS = ["bicycle", "fence", "poem", "river", "lock", "cake", "garden"]
PROMPTS = [f"Tell me how to {verb} a {thing}, step {i}." for i, (verb, thing) in
           enumerate(itertools.islice(itertools.product(VERBS, THINGS), 70))]

needs_bf16 = pytest.mark.skipif(quant.available("bfloat16") is not None, reason=str(quant.available("bfloat16")))


def _records(path) -> list[str]:
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        record["meta"].pop("created")
        lines.append(json.dumps(record, sort_keys=True))
    return sorted(lines)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["auto", "float16", "int8", pytest.param("bfloat16", marks=needs_bf16)])
def test_records_are_the_same_bytes_at_any_batch_size_with_or_without_drafts_and_resumed(tiny_model, tmp_path, dtype):
    import cai

    backends = {draft: HFBackend(str(tiny_model), "tiny", HFOptions(device="cpu", dtype=dtype, draft=draft))
                for draft in (True, False)}
    try:
        def make(name, batch_size, draft=True, **more):
            out = tmp_path / f"{name}.jsonl"
            summary = cai.generate(PROMPTS, str(out), model=backends[draft], batch_size=batch_size, max_new_tokens=10,
                                   temperature=0, filter=False, **more)
            return out, summary

        whole, summary = make("b128", 128)
        assert summary.kept == len(PROMPTS)
        want = _records(whole)
        for batch_size in (1, 7, 64):
            assert _records(make(f"b{batch_size}", batch_size)[0]) == want, f"batch size {batch_size}"
        assert _records(make("b7-nodraft", 7, draft=False)[0]) == want, "no drafts"
        # stopped after a few records at one batch size, resumed at another
        calls = itertools.count()
        cut, first = make("cut", 7, stop=lambda: next(calls) >= 3)
        assert 0 < first.kept < len(PROMPTS)
        assert _records(make("cut", 64, draft=False)[0]) == want, "stopped and resumed"
    finally:
        for backend in backends.values():
            backend.close()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["auto", "int8"])
def test_a_run_stopped_by_sigterm_and_resumed_at_another_batch_size_writes_the_same_bytes(tiny_model, tmp_path, dtype):
    """What a scheduler does to a run: SIGTERM once it has written records (it finishes what is in
    flight, exits 143), then the same command again at another batch size; the file ends with the
    bytes an uncut run writes (`created` aside)."""
    from conftest import plumbing

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"{p}\n" for p in PROMPTS), encoding="utf-8")

    def command(out, batch_size):
        return [sys.executable, "-m", "cai", *plumbing(["generate", prompts, "--model", tiny_model, "-o", out,
                                                        "--dtype", dtype, "--batch-size", str(batch_size),
                                                        "--max-new-tokens", "10", "--temperature", "0", "-q"])]

    whole = tmp_path / "whole.jsonl"
    done = subprocess.run(command(whole, 128), capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()
    cut = tmp_path / "cut.jsonl"
    proc = subprocess.Popen(command(cut, 3), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not (cut.exists() and cut.read_bytes().count(b"\n") >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=300)[1].decode()
    assert proc.returncode == 143, stderr
    assert 0 < cut.read_bytes().count(b"\n") < len(PROMPTS), "the stop must land partway"
    resumed = subprocess.run(command(cut, 64), capture_output=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert _records(cut) == _records(whole)
