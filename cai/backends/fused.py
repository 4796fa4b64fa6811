"""The decoder's forward in five native calls a layer, for the engine on a CPU with cai's bfloat16
kernels (kernels.py), where the model is one whose layers it knows (Llama's: Llama, Mistral, Qwen2).

transformers' forward runs a layer as some forty PyTorch operations and seven products, each a
pass over the rows with its own dispatch; on a CPU with a fast product, those passes took a fifth
of a generation run. Here a layer is:

  1. the input norm and the query/key/value product, one call: the norm is applied to each row
     on its way into the product (never stored), the three weights are one (their panels side by
     side);
  2. the rotary embedding of queries and keys and the keys' and values' write into the cache, one
     pass (rotary.c: transformers' own rotation, operation for operation);
  3. attention (attention.py's native path, reading the queries where the product left them);
  4. the output projection, added into the residual stream in place;
  5. the post-attention norm and the gate and up products with silu(gate) * up, one call; then the
     down projection, added into the residual stream in place.

Every row's result depends on that row alone, as on transformers' forward: the records of a run
do not depend on how it was batched (tests/test_invariance.py). Against transformers' forward
with the same kernels, the norms sum their squares in their own order and silu is cai's, equal to
float32 rounding; the inputs of the products are rounded to bfloat16 after them, which absorbs
that: tests/test_fused.py finds the very same logits on its models, and holds the two to float
rounding of each other wherever a rounding would fall the other way."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cai.backends import kernels
from cai.backends.attention import native_attention
from cai.backends.step_metadata import StepMetadata

MODEL_TYPES = ("llama", "mistral", "qwen2")


def unfusable_reason(model) -> str | None:
    """Why this model's forward cannot run fused (None: it can): a model type whose layers are not
    Llama's, or linears other than cai's native bfloat16 ones."""
    from cai.backends.quant import Bfloat16Linear

    config = model.config
    if config.model_type not in MODEL_TYPES:
        return f"model type '{config.model_type}'"
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation '{getattr(config, 'hidden_act', None)}'"
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, name) for name in ("embed_tokens", "rotary_emb", "norm", "layers")):
        return "not a decoder of the known layout"
    for layer in inner.layers:
        attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        linears = [getattr(attention, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
                  [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(m, Bfloat16Linear) and m._native is not None for m in linears):
            return "linears other than cai's native bfloat16 ones"
        if hasattr(attention, "q_norm") or hasattr(attention, "k_norm"):
            return "query/key norms"
        for norm in (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None)):
            if type(norm).__name__ not in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm") \
                    or not hasattr(norm, "variance_epsilon"):
                return "norms other than RMSNorm"
    return None


@dataclass
class _Layer:
    norm1: torch.Tensor
    eps1: float
    qkv: torch.Tensor            # packed: the query, key and value weights' panels, side by side
    qkv_bias: torch.Tensor | None
    at: tuple[int, int, int]     # where queries, keys and values start in a row of the product
    o: torch.Tensor
    o_bias: torch.Tensor | None
    norm2: torch.Tensor
    eps2: float
    gate_up: torch.Tensor        # packed: the gate's panels, then the up projection's
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


def _joined(modules) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """Packed linears' panels side by side, as one packed weight; each module's weights become a
    view of it (the model holds them once). Returns the weight, the bias (zeros where a module has
    none; None where none has one) and where each module's outputs start."""
    panel = modules[0]._packed.shape[2]
    joined = torch.cat([m._packed for m in modules])
    starts, at = [], 0
    for m in modules:
        count = m._packed.shape[0]
        m._packed = joined[at // panel:at // panel + count]
        starts.append(at)
        at += count * panel
    bias = None
    if any(m.bias is not None for m in modules):
        bias = torch.zeros(at, dtype=torch.float32)
        for m, start in zip(modules, starts):
            if m.bias is not None:
                bias[start:start + m.out_features] = m.bias
    return joined, bias, starts


class FusedDecoder:
    """`model`'s decoder (embedding to final norm) over the engine's cache; see the module's
    docstring. Build it with a model `unfusable_reason` passes."""

    def __init__(self, model):
        inner = model.model
        self.embed, self.rotary, self.norm = inner.embed_tokens, inner.rotary_emb, inner.norm
        first = inner.layers[0].self_attn
        self.dim = first.head_dim
        self.q_heads = first.q_proj.out_features // self.dim
        self.kv_heads = first.k_proj.out_features // self.dim
        self.scale = first.scaling
        self.hidden = model.config.hidden_size
        self.intermediate = inner.layers[0].mlp.gate_proj.out_features
        self.layers = []
        for layer in inner.layers:
            attention, mlp = layer.self_attn, layer.mlp
            qkv, qkv_bias, starts = _joined([attention.q_proj, attention.k_proj, attention.v_proj])
            gate_up, gate_up_bias, _ = _joined([mlp.gate_proj, mlp.up_proj])
            self.layers.append(_Layer(
                norm1=layer.input_layernorm.weight.detach().float().contiguous(),
                eps1=float(layer.input_layernorm.variance_epsilon),
                qkv=qkv, qkv_bias=qkv_bias, at=tuple(starts),
                o=attention.o_proj._packed, o_bias=attention.o_proj.bias,
                norm2=layer.post_attention_layernorm.weight.detach().float().contiguous(),
                eps2=float(layer.post_attention_layernorm.variance_epsilon),
                gate_up=gate_up, gate_up_bias=gate_up_bias,
                down=mlp.down_proj._packed, down_bias=mlp.down_proj.bias))

    def __call__(self, ids: torch.Tensor, step: StepMetadata) -> torch.Tensor:
        """The decoder's last hidden state [ids, hidden] for the packed `ids` [ids] of `step`."""
        linear = kernels._linear
        hidden = self.embed(ids).float()                             # the residual stream, added to in place
        cos, sin = self.rotary(hidden[None], step.positions[None])
        cos, sin = cos[0].float().contiguous(), sin[0].float().contiguous()
        n, group = ids.shape[0], self.q_heads // self.kv_heads
        for index, layer in enumerate(self.layers):
            qkv = linear(hidden, layer.qkv, layer.qkv.shape[0] * layer.qkv.shape[2], layer.qkv_bias, norm=layer.norm1, eps=layer.eps1)
            keys, values = step.cache.keys[index], step.cache.values[index]
            kernels.rotary_write(qkv, layer.at, (self.q_heads, self.kv_heads), self.dim, cos, sin, keys, values,
                                 step.write_rows)
            queries = qkv[:, :self.q_heads * self.dim].view(n, self.kv_heads, group, self.dim).permute(1, 2, 0, 3)
            out = native_attention(step, index, queries, keys, values, self.scale)
            out = out.permute(2, 0, 1, 3).reshape(n, self.q_heads * self.dim)      # token-major already: no copy
            linear(out, layer.o, self.hidden, layer.o_bias, add_to=hidden)
            gated = linear(hidden, layer.gate_up, self.intermediate, layer.gate_up_bias, norm=layer.norm2,
                           eps=layer.eps2, gated=True)
            linear(gated, layer.down, self.hidden, layer.down_bias, add_to=hidden)
        return self.norm(hidden)
