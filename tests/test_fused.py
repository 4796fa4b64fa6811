"""The fused decoder forward (cai/backends/fused.py) and the native pieces it is made of: the
bfloat16 linear's norm, residual and gated modes, and the rotary embedding with the cache write."""

from __future__ import annotations

import copy

import pytest
import torch

from cai.backends import kernels, quant
from cai.backends.fused import unfusable_reason
from cai.backends.kv_cache import SlotCache
from cai.backends.runner import ModelRunner

needs_native = pytest.mark.skipif(not quant.native_bfloat16(), reason="no AVX512-BF16, or no C compiler")


def _model(model_type: str, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type, vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, initializer_range=0.3,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)
    if hasattr(config, "sliding_window"):
        config.sliding_window = None
    torch.manual_seed(1)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _logits(runner: ModelRunner, rows: list[list[int]]) -> torch.Tensor:
    """A prefill of `rows` (one slot each), then one decode step of every row: the logits of all."""
    cache = runner.new_cache(len(rows), 64)
    with torch.inference_mode():
        first = runner.forward(cache, list(range(len(rows))), rows, [0] * len(rows), [0] * len(rows), every=len(rows))
        nxt = [[int(first[sum(map(len, rows[:b + 1])) - 1].argmax())] for b in range(len(rows))]
        second = runner.forward(cache, list(range(len(rows))), nxt, [len(r) for r in rows], [0] * len(rows), every=len(rows))
    return torch.cat([first, second])


@needs_native
@pytest.mark.parametrize("model_type,extra", [("llama", {}), ("mistral", {}), ("qwen2", {}),
                                              ("llama", {"attention_bias": True, "mlp_bias": True})],
                         ids=["llama", "mistral", "qwen2", "llama-with-biases"])
def test_the_fused_forward_gives_transformers_logits(model_type, extra):
    """The same model, the same rows: the fused forward's logits are transformers' forward's to
    float32 rounding (the norms' sums and silu are cai's own). Widths off the kernel's panels
    (k/v 32, the MLP's 96) and biases on every projection go through the joined weights."""
    model = _model(model_type, **extra)
    quant.convert_linears(model, "bfloat16")
    plain = ModelRunner(copy.deepcopy(model), kv_dtype=torch.bfloat16)
    plain.fused = None                                       # transformers' own forward
    fused = ModelRunner(model, kv_dtype=torch.bfloat16)
    assert fused.fused is not None
    rows = [[5, 17, 33, 9, 100, 7], [3, 4], [250, 31, 8, 8, 1, 70, 64, 12, 5]]
    want, got = _logits(plain, rows), _logits(fused, rows)
    assert (got - want).abs().max() < 2e-2 * want.abs().max(), (got - want).abs().max()
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@needs_native
def test_the_fused_weights_are_the_models_own_not_a_copy():
    """The joined q/k/v and gate/up weights are the only copy: the layers' own linears read views
    of them, so the model's memory does not double, and transformers' forward still runs."""
    model = _model("llama")
    quant.convert_linears(model, "bfloat16")
    before = model(torch.tensor([[5, 6, 7]])).logits
    runner = ModelRunner(model, kv_dtype=torch.bfloat16)
    layer, joined = model.model.layers[1], runner.fused.layers[1]
    for module, weight in ((layer.self_attn.q_proj, joined.qkv), (layer.self_attn.v_proj, joined.qkv),
                           (layer.mlp.up_proj, joined.gate_up)):
        assert module._packed.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
    from cai.backends.runner import plain_attention

    with plain_attention(model, "sdpa"):
        assert torch.equal(model(torch.tensor([[5, 6, 7]])).logits, before)


def test_models_the_fused_forward_does_not_know_run_transformers_forward():
    assert unfusable_reason(_model("qwen3", head_dim=16)) is not None          # float32 linears
    for model_type, extra in (("qwen3", {"head_dim": 16}), ("gemma", {"head_dim": 16}), ("phi3", {})):
        model = _model(model_type, **extra)
        if quant.native_bfloat16():
            quant.convert_linears(model, "bfloat16")
        assert unfusable_reason(model) is not None, model_type
    model = _model("llama")
    quant.convert_linears(model, "float16")
    assert "bfloat16" in unfusable_reason(model)


# --- the linear's modes -------------------------------------------------------------------------

def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.bfloat16().double()


@needs_native
@pytest.mark.parametrize("rows,k,n", [(13, 64, 96), (7, 70, 40), (200, 96, 64)])
def test_the_linears_norm_residual_and_gated_modes(rows, k, n):
    """norm: x RMS-normalized on its way in; add_to: the product added to a tensor in place;
    gated: silu(gate) * up of two weights joined. Each against float64 of the rounded operands,
    and each row the same bits alone as among the others."""
    linear = kernels.linear_bf16()
    gen = torch.Generator().manual_seed(rows + k)
    x = torch.randn(rows, k, generator=gen) * 3
    norm = torch.rand(k, generator=gen) + 0.5
    gate, up = torch.randn(n, k, generator=gen) / k ** 0.5, torch.randn(n, k, generator=gen) / k ** 0.5
    bias = torch.randn(n, generator=gen)
    normed = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5) * norm.double()

    out = linear(x, kernels.pack_bf16(gate), n, bias, norm=norm, eps=1e-5)
    torch.testing.assert_close(out.double(), _bf16(normed) @ _bf16(gate).T + bias.double(), atol=2e-2, rtol=1e-2)

    residual = torch.randn(rows, n, generator=gen)
    stream = residual.clone()
    assert linear(x, kernels.pack_bf16(gate), n, bias, add_to=stream) is stream
    torch.testing.assert_close(stream.double(), residual.double() + _bf16(x) @ _bf16(gate).T + bias.double(),
                               atol=1e-3, rtol=1e-4)

    width = -(-n // 64) * 64
    joined = torch.cat([kernels.pack_bf16(gate), kernels.pack_bf16(up)])
    joined_bias = torch.zeros(2 * width)
    joined_bias[:n], joined_bias[width:width + n] = bias, -bias
    gated = linear(x, joined, n, joined_bias, norm=norm, eps=1e-5, gated=True)
    g = _bf16(normed) @ _bf16(gate).T + bias.double()
    u = _bf16(normed) @ _bf16(up).T - bias.double()
    torch.testing.assert_close(gated.double(), torch.nn.functional.silu(g) * u, atol=2e-2, rtol=1e-2)

    for r in (0, rows // 2, rows - 1):
        alone = linear(x[r:r + 1], joined, n, joined_bias, norm=norm, eps=1e-5, gated=True)
        assert torch.equal(alone[0], gated[r]), r
        one = residual[r:r + 1].clone()
        linear(x[r:r + 1], kernels.pack_bf16(gate), n, bias, add_to=one)
        assert torch.equal(one[0], stream[r]), r
    with pytest.raises(ValueError):
        linear(x, joined, n, joined_bias[:n], gated=True)


@needs_native
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
def test_rotary_write_is_transformers_rotation_bit_for_bit(kv_dtype):
    """Queries rotated in place and keys rotated into the cache, the very bits of the model's
    `apply_rotary_pos_emb`; values written as they are; the cache's other rows untouched."""
    from transformers.models.llama.modeling_llama import LlamaConfig, LlamaRotaryEmbedding, apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(5)
    ids, q_heads, kv_heads, dim = 11, 4, 2, 32
    q_at, k_at, v_at = 0, 128, 192                         # the projection's padded panels
    qkv = torch.randn(ids, 256, generator=gen) * 4
    positions = torch.randint(0, 900, (ids,), generator=gen)
    rotary = LlamaRotaryEmbedding(LlamaConfig(hidden_size=q_heads * dim, num_attention_heads=q_heads,
                                              max_position_embeddings=2048))
    cos, sin = rotary(qkv[None], positions[None])
    q = qkv[:, q_at:q_at + q_heads * dim].view(ids, q_heads, dim).transpose(0, 1)[None]
    k = qkv[:, k_at:k_at + kv_heads * dim].view(ids, kv_heads, dim).transpose(0, 1)[None]
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    v = qkv[:, v_at:v_at + kv_heads * dim].clone()
    cache = SlotCache(layers=1, slots=3, kv_heads=kv_heads, head_dim=dim, capacity=40, dtype=kv_dtype, device="cpu")
    slots, index = torch.randint(0, 3, (ids,), generator=gen), torch.randperm(40, generator=gen)[:ids]
    rows = ((slots[None] * kv_heads + torch.arange(kv_heads)[:, None]) * 40 + index[None]).reshape(-1)
    kernels.rotary_write(qkv, (q_at, k_at, v_at), (q_heads, kv_heads), dim, cos[0].contiguous(), sin[0].contiguous(),
                         cache.keys[0], cache.values[0], rows)
    assert torch.equal(qkv[:, :q_heads * dim].view(ids, q_heads, dim).transpose(0, 1), want_q[0])
    keys, values = cache.keys[0].view(-1, dim), cache.values[0].view(-1, dim)
    assert torch.equal(keys[rows], want_k[0].reshape(-1, dim).to(kv_dtype))
    assert torch.equal(values[rows], v.view(ids, kv_heads, dim).transpose(0, 1).reshape(-1, dim).to(kv_dtype))
    others = torch.ones(keys.shape[0], dtype=torch.bool)
    others[rows] = False
    assert not keys[others].any() and not values[others].any()
