"""The engine's model runner: the one place that reaches into a transformers model (with
fused.py, which it runs). It reads the config (the KV layout, the context, which architectures the
engine can drive), registers the engine's attention with transformers and switches the model to
it, runs the decoder's own forward (so rotary embeddings, norms and MLPs are the model's) with the
step's metadata as its cache, and the output head. Where the linears are cai's native bfloat16
ones and the layers Llama's, the forward runs fused instead (fused.py: the same model in five
native calls a layer). The HF backend asks it for what it needs of the model's internals too.

The contract the engine relies on: the forward hands its cache object `update(k, v, layer)` once
per layer and calls the configured attention function, and that attention is plain causal
attention over the whole context. `unsupported_reason()` says which architectures are known to
follow it (tests/test_engine.py checks each against transformers' own generate)."""

from __future__ import annotations

import inspect
import itertools
import threading
from contextlib import contextmanager

import torch
from transformers import AttentionInterface

from cai.backends import kernels
from cai.backends.attention import cascade_attention
from cai.backends.fused import FusedDecoder, unfusable_reason
from cai.backends.kv_cache import SlotCache
from cai.backends.slots import EngineStats
from cai.backends.step_metadata import StepMetadata

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma")


def unsupported_reason(model) -> str | None:
    """Why the engine cannot drive `model`; None when it can."""
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type '{config.model_type}' is not one the engine is tested with"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < (config.max_position_embeddings or 0):
        return "sliding-window attention"
    return None


def kv_layout(config) -> dict:
    """Shape of the model's KV cache per layer: layers, kv_heads, head_dim."""
    heads = config.num_attention_heads
    return dict(layers=config.num_hidden_layers,
                kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads)


def kv_bytes_per_token(model) -> int:
    """Bytes of keys and values one cached position takes, all layers together."""
    shape = kv_layout(model.config)
    return 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * next(model.parameters()).element_size()


def context_length(model) -> int | None:
    """The positions the model was trained for (None where its config does not say)."""
    return getattr(model.config, "max_position_embeddings", None)


def attention_implementation(model) -> str:
    """The attention implementation the model is set to now."""
    return model.config._attn_implementation


@contextmanager
def plain_attention(model, implementation: str):
    """The model on `implementation` (its own, for a plain forward or `generate`), and on what it
    was set to (the engine's, where the engine switched it) afterwards."""
    current = attention_implementation(model)
    if current != implementation:
        model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        if current != implementation:
            model.set_attn_implementation(current)


# The step of the forward under way: the runner sets it around each forward (the model calls the
# attention function with no way to pass it through).
bound = threading.local()


def _transformers_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """The engine's attention as transformers calls an attention function (the mask comes from
    the step's metadata, not `attention_mask`)."""
    return cascade_attention(bound.step, module.layer_idx, query, key, value, scaling), None


ATTENTION = "cai_cascade"
AttentionInterface.register(ATTENTION, _transformers_attention)


class ModelRunner:
    """Runs `model`'s forward over the engine's cache: `new_cache` allocates the storage in the
    model's layout, `forward` runs a step's rows packed into one sequence and returns logits."""

    # A float32 output projection in slices of this many vocabulary rows: one [rows, hidden] ×
    # [hidden, 49k] product runs at a fraction of the speed of the same work in slices (26 against
    # 41 ms at 16 rows for SmolLM2's head on this CPU), and each logit is the same dot product.
    HEAD_SLICE = 1024

    def __init__(self, model, kv_dtype: torch.dtype | None = None, stats: EngineStats | None = None):
        """`kv_dtype`: the dtype keys and values are kept in, where not the model's (bfloat16
        beside the CPU's bf16 linears: half the bytes each decode step streams, and the root's
        product runs on the bf16 units)."""
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"the engine cannot drive this model: {reason}")
        self.model = model
        model.set_attn_implementation(ATTENTION)
        self.stats = stats or EngineStats()
        self.device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        self.kv_dtype = kv_dtype or dtype
        # the native decode kernel, where this device and these dtypes allow it
        self.native = (kernels.decode_attention() if self.device.type == "cpu" and dtype == torch.float32
                       and self.kv_dtype in kernels.KV_DTYPES else None)
        self.layout = kv_layout(model.config)
        # the decoder in a few native calls a layer (fused.py), where the kernels and the model allow
        self.fused = FusedDecoder(model) if self.native is not None and unfusable_reason(model) is None else None
        self.step: StepMetadata | None = None      # the last forward's
        self._head_slices: tuple[torch.Tensor, ...] | None = None
        # transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name warns,
        # and goes in 5.40); take whichever this version's forward has
        accepted = inspect.signature(model.model.forward).parameters
        self._cache_argument = "cache" if "cache" in accepted else "past_key_values"

    def new_cache(self, slots: int, capacity: int) -> SlotCache:
        return SlotCache(slots=slots, capacity=capacity, dtype=self.kv_dtype, device=self.device, **self.layout)

    def forward(self, cache: SlotCache, slots: list[int], ids: list[list[int]], starts: list[int],
                bases: list[int], every: int = 0) -> torch.Tensor:
        """Runs the model on each row's new ids, all rows packed into one sequence: row b is slot
        slots[b] of `cache`, its ids go at positions starts[b], starts[b] + 1, …, and it reads
        its first bases[b] positions from the root; each id attends to every earlier position of
        its own conversation. Returns float logits [k, vocab]: those of every id of the first
        `every` rows, then those of the last id of each other row."""
        counts = [len(x) for x in ids]
        positions = [start + j for start, n in zip(starts, counts) for j in range(n)]
        step = self.step = StepMetadata(cache, slots, counts, positions, bases, self.native)
        packed = torch.tensor([[t for x in ids for t in x]], device=self.device)
        if self.fused is not None:
            hidden = self.fused(packed[0], step)
        else:
            bound.step = step
            try:
                hidden = self.model.model(input_ids=packed, position_ids=step.positions[None], use_cache=True,
                                          **{self._cache_argument: step}).last_hidden_state[0]
            finally:
                bound.step = None
        if every < len(slots):
            # offsets from the lists at hand: slicing by a device tensor would wait on the device
            offsets = list(itertools.accumulate(counts, initial=0))
            last = torch.tensor([offsets[b + 1] - 1 for b in range(every, len(slots))], device=hidden.device)
            hidden = torch.cat([hidden[:offsets[every]], hidden[last]])
        self.stats.ids += len(positions)
        self.stats.head_rows += hidden.shape[0]
        self.stats.attended += sum(positions) + len(positions)
        return self.logits(hidden).float()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output head over `hidden` [rows, hidden size]."""
        head = self.model.get_output_embeddings()
        if not isinstance(head, torch.nn.Linear):        # cai.backends.quant's layers: their own kernel
            return head(hidden)
        if self._head_slices is None:          # (on a GPU one product is the fast way)
            self._head_slices = head.weight.split(self.HEAD_SLICE) if self.device.type == "cpu" else (head.weight,)
        logits = torch.cat([torch.nn.functional.linear(hidden, w) for w in self._head_slices], dim=-1)
        return logits + head.bias if head.bias is not None else logits
