"""The engine (static KV cache, continuous batching, prefix reuse, cascade attention) must give
the tokens transformers' own `generate` gives when it re-encodes every conversation from scratch."""

from __future__ import annotations

import copy
import mmap
import random
import sys

import pytest
import torch

from cai.backends.engine import Engine
from cai.backends.runner import unsupported_reason

VOCAB = 320


def _tiny(model_type: str, init: float = 0.3):
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"head_dim": 16} if model_type in ("qwen3", "gemma") else {}
    config = AutoConfig.for_model(
        model_type, vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, initializer_range=init,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)
    if hasattr(config, "sliding_window"):
        config.sliding_window = None
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return model, copy.deepcopy(model)


def _reference(model, tokens: list[int], max_new: int, stops: list[int]) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([tokens]), attention_mask=torch.ones(1, len(tokens), dtype=torch.long),
                             max_new_tokens=max_new, do_sample=False, eos_token_id=stops or None, pad_token_id=0)
    return out[0, len(tokens):].tolist()


def _run(engine: Engine, requests: dict[str, list[int]], max_new: int) -> dict:
    for key, tokens in requests.items():
        engine.submit(key, tokens, max_new)
    results = {}
    while engine.busy:
        for key, result in engine.step():
            results[key] = result
    return results


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma"])
def test_engine_matches_generate_across_turns(model_type):
    _check_turns(model_type)


def test_engine_plain_attention_path_matches_generate(monkeypatch):
    """The device-agnostic attention (used where PyTorch's CPU flash kernel is not) gives the same tokens."""
    from cai.backends import attention

    monkeypatch.setattr(attention, "_flash", None)
    _check_turns("llama")


def _check_turns(model_type):
    model, reference = _tiny(model_type)
    assert unsupported_reason(model) is None
    rng = random.Random(0)
    root = [rng.randrange(3, VOCAB) for _ in range(40)]            # a shared "system prompt"
    prompts = {f"c{i}": root + [rng.randrange(3, VOCAB) for _ in range(rng.randrange(3, 30))] for i in range(6)}
    prompts["odd"] = [rng.randrange(3, VOCAB) for _ in range(25)]    # shares nothing with the root
    engine = Engine(model, slots=3, stop_ids=[])            # fewer slots than conversations
    conversations = dict(prompts)
    for turn in range(3):
        results = _run(engine, conversations, max_new=6 + turn)
        for key, tokens in conversations.items():
            assert results[key].tokens == _reference(reference, tokens, 6 + turn, []), (model_type, key, turn)
            # the next turn: the answer, then a new user message of a different length per key
            conversations[key] = tokens + results[key].tokens + [rng.randrange(3, VOCAB) for _ in range(4 + 3 * turn)]
        if turn == 0:
            for key in list(conversations)[:2]:    # two conversations end; their slots go to the others
                engine.release(key)
                del conversations[key]
    assert engine.stats.prefill_reused > engine.stats.prefill_computed


def test_engine_without_the_native_kernel_matches_generate(monkeypatch):
    """Where the native decode attention cannot be built, PyTorch's flash kernel reads the own part."""
    from cai.backends import kernels

    monkeypatch.setattr(kernels, "decode_attention", lambda: None)
    _check_turns("llama")


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "phi3"])
def test_engine_forward_uses_no_deprecated_argument(model_type):
    """The engine hands its cache under the name this transformers' forward takes: no
    FutureWarning reaches the user's stderr (transformers 5.24 renamed `past_key_values` to
    `cache`, and the old name goes in 5.40)."""
    import warnings

    model, _ = _tiny(model_type)
    engine = Engine(model, slots=2, stop_ids=[])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        results = _run(engine, {"a": [5, 6, 7], "b": [5, 6, 9, 10]}, 3)
    assert len(results["a"].tokens) == len(results["b"].tokens) == 3


def test_engine_uses_the_native_kernel_where_it_is_built():
    from cai.backends import kernels

    if kernels.decode_attention() is None:
        pytest.skip("no native kernel here (no C compiler, or CAI_NO_KERNELS)")
    model, _ = _tiny("llama")
    engine = Engine(model, slots=2, stop_ids=[])
    _run(engine, {"a": [5, 6, 7]}, 3)
    assert engine.runner.native is not None


@pytest.mark.parametrize("draft", [True, False])
def test_prompt_lookup_drafts_give_the_tokens_of_plain_decoding(draft):
    """Small random weights make the model repeat itself, so prompt-lookup drafts are proposed and
    mostly accepted; the tokens are those of `generate` either way, and with drafting off nothing
    is drafted."""
    model, reference = _tiny("llama", init=0.05)
    rng = random.Random(0)
    root = [rng.randrange(3, VOCAB) for _ in range(40)]
    prompts = {f"c{i}": root + [rng.randrange(3, VOCAB) for _ in range(rng.randrange(3, 30))] for i in range(5)}
    engine = Engine(model, slots=3, stop_ids=[], draft=draft)
    results = _run(engine, prompts, max_new=40)
    for key, tokens in prompts.items():
        assert results[key].tokens == _reference(reference, tokens, 40, []), key
        assert len(results[key].tokens) == 40 and results[key].finish_reason == "length"
    if draft:
        assert engine.stats.accepted > 20 and engine.stats.drafted >= engine.stats.accepted
        assert engine.stats.decode_steps < 60       # one id a step takes 79 here
    else:
        assert engine.stats.drafted == engine.stats.accepted == 0 and engine.stats.decode_steps >= 79


def test_drafts_stop_at_a_stop_id_inside_the_draft():
    model, reference = _tiny("llama", init=0.02)
    prompt = list(range(10, 50))
    free = _reference(reference, prompt, 30, [])
    stop = free[12]                                  # the model loops, so this id recurs inside drafts
    engine = Engine(model, slots=2, stop_ids=[stop])
    result = _run(engine, {"a": prompt}, max_new=30)["a"]
    assert result.tokens == free[:free.index(stop) + 1] and result.finish_reason == "stop"
    # the conversation's cache holds exactly the prompt and the ids before the stop
    slot = engine.scheduler.slot("a")
    assert slot.tokens == prompt + result.tokens[:-1]


def test_drafts_never_grow_the_cache():
    """A finished conversation still holding its slot sits near the end of the cache; a draft's
    padding for it must not push the cache to grow (it is sized for the requests, nothing more)."""
    model, reference = _tiny("llama", init=0.02)
    long_prompt, short_prompt = list(range(3, 203)), list(range(10, 50))
    engine = Engine(model, slots=2, stop_ids=[])
    engine.submit("long", long_prompt, 56)          # 200 + 56: exactly the first 256 positions
    engine.submit("short", short_prompt, 100)
    results = {}
    while engine.busy:
        for key, result in engine.step():
            results[key] = result
    assert engine.cache.capacity == 256
    assert results["short"].tokens == _reference(reference, short_prompt, 100, [])
    assert results["long"].tokens == _reference(reference, long_prompt, 56, [])


def test_engine_stops_on_stop_ids_and_reports_lengths():
    model, reference = _tiny("llama")
    prompt = list(range(10, 40))
    free = _reference(reference, prompt, 8, [])
    stop = free[3]
    engine = Engine(model, slots=2, stop_ids=[stop])
    result = _run(engine, {"a": prompt, "b": prompt[:20]}, max_new=8)
    first = free.index(stop)
    assert result["a"].tokens == free[:first + 1] and result["a"].finish_reason == "stop"
    assert result["b"].tokens == _reference(reference, prompt[:20], 8, [stop])
    assert result["a"].prompt_tokens == 30


def test_turn_reuses_the_cache_of_the_previous_one():
    model, reference = _tiny("llama")
    engine = Engine(model, slots=1, stop_ids=[])
    first = _run(engine, {"a": list(range(5, 45))}, max_new=5)["a"]
    assert first.reused_tokens == 0
    follow = list(range(5, 45)) + first.tokens + [7, 8, 9]
    second = _run(engine, {"a": follow}, max_new=5)["a"]
    # everything but the last generated id (never fed back) comes from the cache
    assert second.reused_tokens == 40 + 4
    assert second.tokens == _reference(reference, follow, 5, [])


def test_cache_grows_when_a_conversation_outgrows_it():
    model, reference = _tiny("llama")
    engine = Engine(model, slots=2, stop_ids=[])
    short = list(range(3, 23))
    first = _run(engine, {"a": short, "b": short[::-1]}, max_new=4)
    capacity = engine.cache.capacity
    long = short + first["a"].tokens + [rng % (VOCAB - 3) + 3 for rng in range(capacity + 40)]
    second = _run(engine, {"a": long}, max_new=4)["a"]
    assert engine.cache.capacity > capacity
    assert second.tokens == _reference(reference, long, 4, [])


def test_sampling_is_seeded_per_request_whatever_else_is_in_flight():
    model, _ = _tiny("llama")
    prompt = list(range(10, 50))

    def sample(others: int) -> list[int]:
        engine = Engine(model, slots=4, stop_ids=[])
        engine.submit("x", prompt, 12, temperature=0.9, top_p=0.95, seed=123)
        for i in range(others):
            engine.submit(f"o{i}", list(range(60 + i, 90)), 12, temperature=0.9, seed=i)
        out = {}
        while engine.busy:
            out.update(dict(engine.step()))
        return out["x"].tokens

    alone = sample(0)
    assert alone == sample(3)
    engine = Engine(model, slots=1, stop_ids=[])
    engine.submit("x", prompt, 12, temperature=0.9, top_p=0.95, seed=124)
    other = {}
    while engine.busy:
        other.update(dict(engine.step()))
    assert other["x"].tokens != alone, "another seed samples another continuation"


def test_engine_refuses_what_does_not_fit_the_context():
    model, _ = _tiny("llama")
    engine = Engine(model, slots=1, stop_ids=[], context_length=64)
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        engine.submit("a", list(range(3, 63)), 8)


def test_unsupported_architectures_are_named():
    model, _ = _tiny("mistral")
    model.config.sliding_window = 16
    assert unsupported_reason(model) == "sliding-window attention"


def test_pipeline_records_are_the_same_with_and_without_the_engine(tiny_model):
    """Greedy records from the engine (3 in flight, two revision rounds, so each conversation
    reuses its cache four times) equal those of plain generate, batch 1, re-encoding every turn.
    float16 weights: with bfloat16's (auto on an AVX512-BF16 CPU) the engine's attention and
    plain generate's round differently, as int8's do (cai/backends/quant.py)."""
    from pathlib import Path

    from cai.backends.base import SamplingParams
    from cai.backends.hf import HFBackend, HFOptions
    from cai.constitution import load_constitution
    from cai.inputs import read_prompts
    from cai.pipeline import Pipeline, RunConfig
    from cai.templates import load_templates

    items = read_prompts(str(Path(__file__).resolve().parent.parent / "examples/prompts.jsonl"))[:7]
    params = SamplingParams(max_new_tokens=10, temperature=0)
    records = {}
    for engine, width in ((True, 3), (False, 1)):
        backend = HFBackend(str(tiny_model), "tiny", HFOptions(engine=engine, dtype="float16"))
        pipeline = Pipeline(backend, load_constitution("harmless"), load_templates("default"),
                            RunConfig(revisions=2, seed=0, batch_size=width, params=params))
        jobs, _ = pipeline.plan(items)
        records[engine] = {r["id"]: r for batch in pipeline.run(jobs) for r in batch}
        for r in records[engine].values():
            del r["meta"]["created"]
        assert (backend.engine is not None) == engine
        if engine:
            assert backend.engine.stats.prefill_reused > backend.engine.stats.prefill_computed
    assert len(records[True]) == 7
    assert records[True] == records[False]


def test_pipeline_sizes_the_cache_once_from_its_longest_conversation(tiny_model, monkeypatch):
    """The pipeline's bound on a whole conversation (every turn at max_new_tokens) reaches the
    engine, which allocates its cache once at that size: no grow (a copy of the whole cache)
    mid-run, and no more positions than the bound needs."""
    from pathlib import Path

    from cai.backends.base import SamplingParams
    from cai.backends.kv_cache import SlotCache
    from cai.backends.hf import HFBackend
    from cai.constitution import load_constitution
    from cai.inputs import read_prompts
    from cai.pipeline import Pipeline, RunConfig
    from cai.templates import load_templates

    def refuse(self, capacity, lengths):
        raise AssertionError(f"the cache grew to {capacity}")

    monkeypatch.setattr(SlotCache, "grow", refuse)
    items = read_prompts(str(Path(__file__).resolve().parent.parent / "examples/prompts.jsonl"))[:5]
    backend = HFBackend(str(tiny_model), "tiny")
    pipeline = Pipeline(backend, load_constitution("harmless"), load_templates("default"),
                        RunConfig(revisions=2, seed=0, batch_size=3,
                                  params=SamplingParams(max_new_tokens=24, temperature=0)))
    jobs, _ = pipeline.plan(items)
    longest = max(j.tokens for j in jobs)
    assert all(j.tokens > 5 * 24 for j in jobs)
    records = [r for batch in pipeline.run(jobs) for r in batch]
    assert len(records) == 5
    # the slots hold each conversation's own positions only: the bound less the shared opening
    # (system prompt and worked examples), which the root holds once
    engine = backend.engine
    assert len(engine.scheduler.root_tokens) > longest // 2
    assert longest - len(engine.scheduler.root_tokens) <= engine.cache.capacity < -(-longest // 256) * 256


def test_slots_hold_no_copy_of_the_root_and_shares_may_differ():
    """The root (the first prompt) is stored once; a slot holds only the positions past its own
    share of it. Conversations share different lengths of it (one a token more, one half, one
    none), a later turn may differ inside the shared part, and every token is still the one plain
    generate gives, with a cache sized for the own parts alone."""
    model, reference = _tiny("llama")
    rng = random.Random(3)
    root = [rng.randrange(3, VOCAB) for _ in range(300)]
    tail = [rng.randrange(3, VOCAB) for _ in range(10)]
    prompts = {
        "first": root + tail,                                              # becomes the root
        "one-more": root + tail[:1] + [rng.randrange(3, VOCAB) for _ in range(9)],
        "plain": root + [rng.randrange(3, VOCAB) for _ in range(12)],
        "half": root[:150] + [rng.randrange(3, VOCAB) for _ in range(40)],
        "none": [rng.randrange(3, VOCAB) for _ in range(30)],
    }
    engine = Engine(model, slots=5, stop_ids=[])
    results = _run(engine, prompts, max_new=8)
    for key, tokens in prompts.items():
        assert results[key].tokens == _reference(reference, tokens, 8, []), key
    assert engine.cache.capacity == 256          # 310 + 8 positions a slot would need 512
    assert engine.cache.root[0][0].shape[1] == 310
    assert {s.key: s.root_shared for s in engine.scheduler.active} == {
        "first": 310, "one-more": 301, "plain": 300, "half": 150, "none": 0}
    # the next turn of "plain" changes the shared part (a new system prompt of the same length)
    follow = root[:100] + [rng.randrange(3, VOCAB) for _ in range(200)] + prompts["plain"][300:] + results["plain"].tokens
    again = _run(engine, {"plain": follow, "one-more": prompts["one-more"] + results["one-more"].tokens + [5, 6]},
                 max_new=8)
    assert again["plain"].tokens == _reference(reference, follow, 8, [])
    assert again["plain"].reused_tokens == 100
    assert again["one-more"].tokens == _reference(reference, prompts["one-more"] + results["one-more"].tokens + [5, 6], 8, [])


def test_engine_counts_the_arithmetic_it_does():
    """The counters a bench turns into FLOPs: ids through the model, output-head rows, and the
    positions every id attended to (its own included)."""
    model, _ = _tiny("llama")
    engine = Engine(model, slots=1, stop_ids=[], draft=False)
    _run(engine, {"a": list(range(10, 20))}, max_new=3)
    # the prompt's 10 ids (positions 0-9, one head row), then two decode steps at positions 10, 11
    assert (engine.stats.ids, engine.stats.head_rows) == (12, 3)
    assert engine.stats.attended == sum(range(1, 11)) + 11 + 12


def test_cache_memory_is_backed_only_where_written():
    """The cache is sized for the longest conversation a run could hold; on a CPU it costs only
    the pages its conversations reach (an anonymous mapping), and reads elsewhere give zeros."""
    from cai.backends.kv_cache import SlotCache

    def rss_mb() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

    before = rss_mb()
    cache = SlotCache(layers=2, slots=64, kv_heads=2, head_dim=16, capacity=4096, dtype=torch.float32,
                      device=torch.device("cpu"))
    assert cache.bytes == 4 * 64 * 2 * 4096 * 16 * 4          # 128 MiB allocated
    cache.keys[0][3, :, :100] = 1.0
    assert rss_mb() - before < 32
    assert float(cache.keys[0][3, :, :100].sum()) == 2 * 100 * 16 and float(cache.keys[1].abs().sum()) == 0.0
    cache.grow(8192, [0, 0, 0, 100])
    assert float(cache.keys[0][3, :, :100].sum()) == 2 * 100 * 16 and cache.keys[0].shape[2] == 8192


@pytest.mark.parametrize("native", [True, False])
def test_a_bfloat16_cache_is_read_to_its_rounding(monkeypatch, native):
    """`kv_dtype` (bfloat16 beside the CPU's bf16 linears): slots and root keep keys and values in
    bfloat16, the native kernel (or PyTorch's, without it) reads them, and the logits stay within
    bfloat16 rounding of a float32 cache's, forward by forward."""
    from cai.backends import kernels

    if native and kernels.decode_attention() is None:
        pytest.skip("no native kernel here")
    if not native:
        monkeypatch.setattr(kernels, "decode_attention", lambda: None)
    model, _ = _tiny("llama", init=0.05)
    rng = random.Random(5)
    root = [rng.randrange(3, VOCAB) for _ in range(120)]
    prompts = {f"c{i}": root[:120 - 30 * (i % 2)] + [rng.randrange(3, VOCAB) for _ in range(6 + i)] for i in range(4)}
    seen: dict[str, list[torch.Tensor]] = {"float32": [], "bfloat16": []}
    for name, dtype in (("float32", None), ("bfloat16", torch.bfloat16)):
        engine = Engine(model, slots=4, stop_ids=[], kv_dtype=dtype, draft=False)
        assert (engine.runner.native is not None) == native
        logits = engine.runner.logits
        monkeypatch.setattr(engine.runner, "logits", lambda hidden, keep=seen[name], f=logits: keep.append(f(hidden)) or keep[-1])
        _run(engine, prompts, max_new=4)          # the root's conversation alone, then the rest read the root
        want = dtype or torch.float32
        assert engine.cache.root[0][0].dtype == want and engine.cache.keys[0].dtype == want
        step = engine.runner.step            # two shares of the root: the masked part is read too
        assert (len(set(step.root_positions.tolist())) > 1) if native else step.ragged is not None
    assert [t.shape for t in seen["float32"]] == [t.shape for t in seen["bfloat16"]]
    for exact, rounded in zip(seen["float32"], seen["bfloat16"]):
        error = ((rounded - exact).norm() / exact.norm()).item()
        assert 0 < error < 2e-2, error


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cache_writes_each_id_to_its_slot_and_position(dtype):
    """A step's `update` writes a forward's keys and values [1, heads, ids, dim] as one row copy
    per (kv head, id): each lands at its own slot and position (past the row's root share), and
    nothing else in the cache changes."""
    from cai.backends.kv_cache import SlotCache
    from cai.backends.step_metadata import StepMetadata

    cache = SlotCache(layers=2, slots=4, kv_heads=3, head_dim=8, capacity=16, dtype=dtype, device=torch.device("cpu"))
    for store in (cache.keys, cache.values):
        for layer in store:
            layer.copy_(torch.randn(layer.shape))
    before = [t.clone() for t in (*cache.keys, *cache.values)]
    slots, counts, bases = [2, 0, 3], [1, 3, 2], [0, 5, 2]
    positions = [7, 9, 10, 11, 2, 3]
    step = StepMetadata(cache, slots, counts, positions, bases)
    keys, values = torch.randn(1, 3, 6, 8), torch.randn(1, 3, 6, 8)
    step.update(keys, values, 1)
    expected = [t.clone() for t in before]
    ids_slot = [2, 0, 0, 0, 3, 3]
    ids_index = [7, 4, 5, 6, 0, 1]             # position less the row's base
    for t, (slot, index) in enumerate(zip(ids_slot, ids_index)):
        expected[1][slot, :, index] = keys[0, :, t].to(dtype)
        expected[3][slot, :, index] = values[0, :, t].to(dtype)
    for got, want in zip((*cache.keys, *cache.values), expected):
        assert torch.equal(got, want)


def _resident_bytes(tensor: torch.Tensor) -> int:
    """Bytes of a CPU tensor's memory that the kernel has backed with pages (mincore)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    start = tensor.data_ptr() // page * page
    length = tensor.data_ptr() + tensor.numel() * tensor.element_size() - start
    vector = (ctypes.c_ubyte * (-(-length // page)))()
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), vector) == 0
    return sum(v & 1 for v in vector) * page


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore, as Linux has it")
def test_growing_the_cache_backs_only_the_positions_in_use():
    """A grow copies each slot's stored positions, not its whole old capacity: the new mapping
    stays unbacked past them (copying the old capacity made every slot's pages resident)."""
    from cai.backends.kv_cache import SlotCache
    from cai.backends.step_metadata import StepMetadata

    cache = SlotCache(layers=1, slots=4, kv_heads=2, head_dim=64, capacity=4096, dtype=torch.float32,
                      device=torch.device("cpu"))
    step = StepMetadata(cache, [0, 1], [10, 10], list(range(10)) * 2, [0, 0])
    keys, values = torch.randn(1, 2, 20, 64), torch.randn(1, 2, 20, 64)
    step.update(keys, values, 0)
    cache.grow(8192, [10, 10])
    assert cache.capacity == 8192 and cache.keys[0].shape == (4, 2, 8192, 64)
    assert torch.equal(cache.keys[0][0, :, :10], keys[0, :, :10])
    assert torch.equal(cache.values[0][1, :, :10], values[0, :, 10:])
    assert not cache.keys[0][2:].any() and not cache.keys[0][:2, :, 10:].any()
    # (the reads above touch every page, so count on a fresh grow)
    cache.grow(16384, [10, 10])
    assert _resident_bytes(cache.keys[0]) <= 16 * mmap.PAGESIZE     # 2 slots × 2 heads × 10 positions


def test_an_ids_logits_are_the_same_bits_however_its_conversation_is_cut_into_forwards():
    """What keeps records the same however a run is batched, at the level of bits: the logits of
    an id do not depend on how its conversation was cut into forwards (one prefill, a prefill in
    chunks, a prefill then one id a step as decoding goes) nor on the rows that share a forward
    (other lengths, other shares of the root, none). Greedy output hides a last-bit difference
    almost always; over millions of ids, a near tie between two tokens does not."""
    from cai.backends import kernels
    from cai.backends.runner import ModelRunner

    if kernels.decode_attention() is None:
        pytest.skip("no native kernel here: PyTorch's kernels sum by the shape of each call")
    from cai.backends import quant

    if quant.available("float16"):
        pytest.skip(quant.available("float16"))
    model, _ = _tiny("llama", init=0.05)
    # the CPU's default linears (fbgemm, float16 weights): a row's sums do not depend on the rows
    # beside it (plain float32 goes through MKL's sgemm, whose blocking does)
    quant.convert_linears(model, "float16")
    runner = ModelRunner(model)
    rng = random.Random(11)
    ids = lambda n: [rng.randrange(3, VOCAB) for _ in range(n)]          # noqa: E731
    root, mine, other, lone = ids(40), ids(37), ids(23), ids(9)
    root_cache = runner.new_cache(1, 64)
    runner.forward(root_cache, [0], [root], [0], [0])
    base = 25                                       # this conversation shares the root's first 25 ids

    def fresh():
        cache = runner.new_cache(3, 128)
        cache.take_root(root_cache, len(root))
        return cache

    whole = runner.forward(fresh(), [0], [mine], [base], [base], every=1)
    # a prefill in chunks (4, then 33 beside a row on the whole root and one on none of it)
    cache = fresh()
    first = runner.forward(cache, [0], [mine[:4]], [base], [base], every=1)
    rest = runner.forward(cache, [1, 0, 2], [other, mine[4:], lone], [40, base + 4, 0], [40, base, 0], every=3)
    assert torch.equal(first, whole[:4])
    assert torch.equal(rest[len(other):len(other) + 33], whole[4:])
    # a prefill of 20, then one id a forward, beside another row decoding
    cache = fresh()
    runner.forward(cache, [0, 1], [mine[:20], other], [base, 40], [base, 40])
    for k in range(20, len(mine)):
        step = runner.forward(cache, [1, 0], [[other[k % len(other)]], [mine[k]]],
                              [40 + len(other) + k - 20, base + k], [40, base])
        assert torch.equal(step[1], whole[k]), f"id {k}"
