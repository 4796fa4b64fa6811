"""A run's records are the same bytes however the run is cut: batch sizes 1, 7, 64 and 128, the
engine's drafts on or off, and a run stopped partway then resumed at another batch size. On the
CPU's default arithmetic (float16 weights, float32 sums) and int8 everywhere, and on its bf16
units where it has them. What makes it hold is an id's logits being the same bits whatever shares its forward
(tests/test_engine.py checks that directly); this checks what a user sees, on the tiny model,
whose near-even random logits turn a last-bit difference into another token quickly."""

from __future__ import annotations

import itertools
import json

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
@pytest.mark.parametrize("dtype", ["auto", "int8", pytest.param("bfloat16", marks=needs_bf16)])
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
