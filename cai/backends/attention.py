"""The engine's attention: over [root prefix | each row's own positions], reading its layout from
the step's metadata (step_metadata.py) rather than from a mask in the forward's arguments. Plain
PyTorch: the runner (runner.py) registers it with transformers and hands it each layer's call.

Where there is a native kernel (kernels.py), it takes every id, the root included: each
(row, kv head) task reads that row's keys to its own length, in one order per query whatever the
forward, so an id's result is the same in a decode step, a draft or a prefill, and beside any
other rows. Without it (no compiler, or a GPU), PyTorch's kernels: rows padded to one width
through the flash kernel, and the root prefix, stored once, one product for all rows (and a
second, masked, for the few root positions only some rows share)."""

from __future__ import annotations

import torch

from cai.backends.step_metadata import StepMetadata


def cascade_attention(step: StepMetadata, layer: int, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, scaling: float | None = None) -> torch.Tensor:
    """Attention over [root prefix | each row's own positions] for `layer`; the two parts are
    joined under one softmax through their log-sum-exps. `query` [1, heads, ids, dim] holds the
    packed ids of every row; `key`/`value` are what `StepMetadata.update` returned. Returns
    [1, ids, heads, dim]."""
    _, q_heads, n_ids, dim = query.shape
    kv_heads = step.kv_heads
    group = q_heads // kv_heads
    scale = scaling if scaling is not None else dim ** -0.5
    # Query heads h*group … h*group+group-1 read kv head h (transformers' repeat_kv order), so a
    # kv head's queries are one block of group*ids rows.
    queries = query[0].reshape(kv_heads, group, n_ids, dim)
    if step.native is not None:
        out = native_attention(step, layer, queries, key, value, scale)
    else:
        out = _pytorch(step, layer, queries, key, value, scale)
    # the log-sum-exp weights are float32; in bfloat16 or float16 the result must come back in the
    # model's dtype, or the next linear layer refuses it
    return out.to(query.dtype).reshape(q_heads, n_ids, dim).transpose(0, 1)[None]


def native_attention(step: StepMetadata, layer: int, queries, key, value, scale: float) -> torch.Tensor:
    """Every id through the native kernel: the root's part (each id up to its row's base; the
    root is one slot all rows read), then its own, which starts from the root's softmax."""
    root = None
    if step.root_positions is not None:
        root_k, root_v = step.cache.root[layer]
        root = step.native(queries, root_k[None], root_v[None], step.root_slots, step.offsets,
                           step.root_positions, 0, scale)
    out, _ = step.native(queries, key, value, step.slots, step.offsets, step.index, 0, scale, root)
    return out


def _pytorch(step: StepMetadata, layer: int, queries, key, value, scale: float) -> torch.Tensor:
    """PyTorch's kernels: the root is one product for all ids at once (two where rows share
    different lengths of it), so its keys and values are read once per layer; each row's own
    positions go padded to one width through the flash kernel."""
    kv_heads, group, n_ids, dim = queries.shape
    part = _flash if queries.device.type == "cpu" and _flash is not None else _plain_part
    root = None
    flat = queries.reshape(1, kv_heads, group * n_ids, dim)
    for root_k, root_v, mask in step.root_parts(layer, group):
        o, l = part(flat.to(root_k.dtype), root_k, root_v, mask, scale)
        o, l = o.view(kv_heads, group, n_ids, dim).float(), l.view(kv_heads, group, n_ids)
        root = (o, l) if root is None else _join(*root, o, l)
    rows, width = step.pad_index.shape
    padded = queries[:, :, step.pad_index].permute(2, 0, 1, 3, 4).reshape(rows, kv_heads, group * width, dim)
    mask = step.mask[:, None, None].expand(rows, 1, group, width, -1).reshape(rows, 1, group * width, -1)
    o, l = part(padded.to(key.dtype), step.padded_part(key), step.padded_part(value), mask, scale)
    o = o.view(rows, kv_heads, group, width, dim)[step.id_row, :, :, step.id_column].permute(1, 2, 0, 3)
    l = l.view(rows, kv_heads, group, width)[step.id_row, :, :, step.id_column].permute(1, 2, 0)
    if root is not None:
        o, _ = _join(o, l, *root)
    return o


def _join(out, lse, other, other_lse):
    """Two parts' softmax-weighted values joined under one softmax, through their log-sum-exps."""
    top = torch.maximum(lse, other_lse)
    weight, other_weight = (lse - top).exp_(), (other_lse - top).exp_()
    total = weight + other_weight
    return (out * weight[..., None] + other * other_weight[..., None]) / total[..., None], top + total.log_()


def _plain_part(queries, key, value, mask, scale):
    """Softmax attention of `queries` over `key`/`value` with an additive `mask`, and the
    log-sum-exp of each query's scores (what joins two parts under one softmax)."""
    scores = torch.matmul(queries * scale, key.transpose(-1, -2))
    if mask is not None:
        scores += mask
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(scores.sub_(lse[..., None]).exp_(), value), lse


def _cpu_flash(queries, key, value, mask, scale):
    """The same through PyTorch's CPU flash-attention kernel (blocked, no scores tensor)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        queries, key, value, 0.0, False, attn_mask=mask, scale=scale)


_flash = _cpu_flash if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu") else None

