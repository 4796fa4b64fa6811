"""A continuous-batching decode engine over a transformers causal LM.

What makes it fast on a CPU (and sound on a GPU):
  * a static per-slot KV cache: each conversation in flight owns one slot (a row of
    [slots, kv_heads, capacity, head_dim] tensors per layer); new keys and values are written in
    place, so no step ever copies the cache the way a growing `torch.cat` cache does;
  * continuous batching: a conversation whose turn ends leaves the decode batch at once and the
    next request takes its place, so batches stay full rather than waiting for the longest;
  * prefix reuse: a request is matched token by token against what its slot already holds (the
    previous turn of the same conversation) or, for a new conversation, against the first
    conversation seen (the shared system prompt and few-shot turns); only the part that differs
    is encoded;
  * prefills are grouped by length so that padding stays small.

The engine speaks token ids only: the HF backend owns the tokenizer and the chat template. It
drives the model's own forward (so rotary embeddings, norms and MLPs are the model's), handing it
this cache as `past_key_values` and switching the model to `cascade_attention`, which takes its
mask from the cache; `supports()` says which architectures are known to follow that contract."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface

from cai.backends import kernels

# Architectures whose forward hands a cache object `update(k, v, layer)` and calls the configured
# attention function, and whose attention is plain causal attention over the whole context (tests/test_engine.py
# checks each against transformers' own generate).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma")


def supports(model) -> str | None:
    """None when the engine can drive `model`, else why not."""
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


@dataclass
class EngineResult:
    tokens: list[int]        # generated ids, the stop token included when one ended the turn
    finish_reason: str       # "stop" or "length"
    prompt_tokens: int       # ids in the request
    reused_tokens: int       # of those, how many came from the cache instead of being encoded


@dataclass
class EngineStats:
    prefill_computed: int = 0    # prompt ids run through the model
    prefill_reused: int = 0      # prompt ids whose keys and values came from the cache
    decode_steps: int = 0        # decode forwards
    drafted: int = 0             # ids proposed by prompt lookup and checked
    accepted: int = 0            # of those, how many the model agreed with (tokens gained for free)


@dataclass
class _Request:
    key: str
    tokens: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None


@dataclass
class _Slot:
    key: str
    tokens: list[int] = field(default_factory=list)      # ids whose K/V are in this slot, in order
    pending: list[int] = field(default_factory=list)     # ids still to encode before decoding
    generated: list[int] = field(default_factory=list)
    request: _Request | None = None
    generator: torch.Generator | None = None
    state: str = "idle"                                  # prefill → decode → done
    fresh: bool = False                                  # a new conversation, not yet matched to the root
    root_shared: int = 1 << 30                           # leading positions identical to the root's
    reused: int = 0
    lookup: dict = field(default_factory=dict)           # (id, id) → where that pair last ended in tokens
    indexed: int = 0                                     # tokens[:indexed] are in `lookup`


class SlotCache:
    """Per-layer key/value tensors of shape [slots, kv_heads, capacity, head_dim], plus the root
    prefix (the first conversation's prompt) once per layer. Before each forward, `bind` says which
    slots take part, where the new positions go and how much of the root every row shares; the
    model then calls `update` once per layer (the one Cache method its forward uses) and the
    engine's attention function reads the rest from here."""

    # Forwards of at most this many ids a row (decode steps, drafts included) take their own-part
    # attention from the native kernel where there is one (cai/backends/decode_attention.c);
    # longer ones (prefills) from PyTorch's flash kernel, whose blocked GEMMs suit many queries.
    NATIVE_MAX_IDS = 16

    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device, native=None):
        shape = (slots, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.capacity = capacity
        self.root: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.shared = 0                     # root positions every row of this forward shares
        self.mask: torch.Tensor | None = None
        self._rows: slice | torch.Tensor = slice(0, 0)
        self._batch_index: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None   # [batch, q] of the forward being run
        self._kv_len = 0
        self._native = native                # kernels.decode_attention() or None
        self.native = None                   # this forward's native kernel, if it uses one
        self.slot_index: torch.Tensor | None = None

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def grow(self, capacity: int) -> None:
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = old.new_zeros((*old.shape[:2], capacity, old.shape[3]))
                new[:, :, :self.capacity] = old
                store[i] = new
        self.capacity = capacity

    def bind(self, rows: slice | torch.Tensor, positions: torch.Tensor, kv_len: int, shared: int) -> None:
        """`rows`: the slots in batch order (a slice is a view, an index tensor a gather);
        `positions` [batch, q]: where each new token's key and value go; `kv_len`: how many
        positions attention reads; `shared`: how many leading positions come from the root."""
        self._rows = rows
        self.positions = positions
        self._batch_index = torch.arange(positions.shape[0], device=positions.device)[:, None]
        self._kv_len = kv_len
        self.shared = shared
        self.native = self._native if positions.shape[1] <= self.NATIVE_MAX_IDS else None
        if self.native is not None:
            # the kernel reads each row's own length from `positions`: no mask, no padded views
            self.slot_index = torch.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows
            self.mask = None
            return
        keys = torch.arange(shared, kv_len, device=positions.device)
        allowed = keys[None, None, :] <= positions[:, :, None]                    # [batch, q, kv]
        self.mask = torch.zeros(allowed.shape, dtype=self.keys[0].dtype, device=positions.device)
        self.mask.masked_fill_(~allowed, float("-inf"))

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.native is not None:                           # the kernel reads the whole cache
            for store, new in ((self.keys, key_states), (self.values, value_states)):
                tensor = store[layer_idx]
                tensor[self.slot_index[:, None], :, self.positions] = new.transpose(1, 2)
            return self.keys[layer_idx], self.values[layer_idx]
        out = []
        for store, new in ((self.keys, key_states), (self.values, value_states)):
            tensor = store[layer_idx]
            new = new.transpose(1, 2)                         # [batch, q, heads, dim]
            if isinstance(self._rows, slice):
                view = tensor[self._rows]
                view[self._batch_index, :, self.positions] = new
                out.append(view[:, :, self.shared:self._kv_len])
            else:
                tensor[self._rows[:, None], :, self.positions] = new
                out.append(tensor[self._rows, :, self.shared:self._kv_len])
        return out[0], out[1]

    def copy(self, source: int, target: int, length: int) -> None:
        for store in (self.keys, self.values):
            for tensor in store:
                tensor[target, :, :length] = tensor[source, :, :length]

    def save_root(self, slot: int, length: int) -> None:
        self.root = [(k[slot, :, :length].clone(), v[slot, :, :length].clone()) for k, v in zip(self.keys, self.values)]

    def load_root(self, slot: int, length: int) -> None:
        for (rk, rv), k, v in zip(self.root, self.keys, self.values):
            k[slot, :, :length] = rk[:, :length]
            v[slot, :, :length] = rv[:, :length]


_bound = threading.local()


def cascade_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """Attention over [root prefix | each row's own positions], as a transformers attention
    function. The root part is one product for all rows at once (every row shares those keys), so
    its keys and values are read once per layer instead of once per row; the two parts are joined
    under one softmax through their log-sum-exps. `key`/`value` [batch, kv_heads, kv, dim] are the
    rows' own positions from `shared` on; the additive mask comes from `bind`."""
    cache: SlotCache = _bound.cache
    batch, q_heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    group = q_heads // kv_heads
    scale = scaling if scaling is not None else dim ** -0.5
    # Query heads h*group … h*group+group-1 read kv head h (transformers' repeat_kv order), so a
    # kv head's queries are one block of group*q_len rows, and one mask row serves each query.
    queries = query.reshape(batch, kv_heads, group * q_len, dim)
    mask = None if cache.mask is None else \
        cache.mask[:, None, None].expand(batch, 1, group, q_len, -1).reshape(batch, 1, group * q_len, -1)
    shared = cache.shared
    part = _flash if query.device.type == "cpu" and _flash is not None else _plain_part
    if cache.native is not None:
        out, lse = cache.native(queries, key, value, cache.slot_index, cache.positions, shared, scale)
    else:
        out, lse = part(queries, key, value, mask, scale)                 # [b, kv, g*q, dim], [b, kv, g*q]
    if shared:
        root_k, root_v = cache.root[module.layer_idx]
        flat = queries.transpose(0, 1).reshape(1, kv_heads, batch * group * q_len, dim)
        common, common_lse = part(flat, root_k[None, :, :shared], root_v[None, :, :shared], None, scale)
        common = common[0].view(kv_heads, batch, group * q_len, dim).transpose(0, 1)
        common_lse = common_lse[0].view(kv_heads, batch, group * q_len).transpose(0, 1)
        top = torch.maximum(lse, common_lse)
        own_w, common_w = (lse - top).exp_(), (common_lse - top).exp_()
        out = (out * own_w[..., None] + common * common_w[..., None]) / (own_w + common_w)[..., None]
    out = out.view(batch, kv_heads, group, q_len, dim).permute(0, 3, 1, 2, 4)
    return out.reshape(batch, q_len, q_heads, dim), None


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


ATTENTION = "cai_cascade"
AttentionInterface.register(ATTENTION, cascade_attention)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Engine:
    """Requests in, finished turns out. `submit` a conversation's token ids under a key (the same
    key again for its next turn, so the cache carries over), call `step` until results come back,
    and `release` the key when the conversation is over."""

    # Prefill groups: at most this many tokens (rows × padded length) in one forward, and rows
    # whose lengths differ by more than this factor go to separate forwards.
    PREFILL_TOKENS = 4096
    PREFILL_SPREAD = 1.3

    # Prompt-lookup drafting (greedy turns only): a row whose last two ids occurred earlier in its
    # conversation proposes the ids that followed them there, up to DRAFT_MAX; one forward checks
    # them all, and every id the model agrees with saves a decode step (the small model repeats
    # itself and its revisions copy its answers). All rows of a forward share one width, so a
    # draft is worth its columns only where the step's fixed cost (attention reads, per-op
    # overhead; DRAFT_STEP_COST rows' worth of compute, measured on a 2-core CPU) shared among
    # few rows outweighs the compute spent on padding and rejected ids: drafts are long in the
    # tail of a run and absent in a full batch unless nearly every row has one.
    DRAFT_MAX = 8
    DRAFT_STEP_COST = 40

    def __init__(self, model, slots: int, stop_ids: list[int], pad_id: int, context_length: int | None = None,
                 draft: bool = True, capacity: int | None = None):
        """`capacity`: positions a slot needs for the longest conversation expected, where known;
        the cache is then allocated once at that size instead of growing (a grow copies the whole
        cache) as longer conversations arrive."""
        reason = supports(model)
        if reason:
            raise ValueError(f"the engine cannot drive this model: {reason}")
        self.model = model
        model.set_attn_implementation(ATTENTION)
        self.slots = slots
        self.stop_ids = set(stop_ids)
        self.pad_id = pad_id
        self.context_length = context_length
        self.draft = draft
        self.device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        native = kernels.decode_attention() if self.device.type == "cpu" and dtype == torch.float32 else None
        self._layout = dict(kv_layout(model.config), dtype=dtype, device=self.device, native=native)
        self.cache: SlotCache | None = None
        self.capacity_hint = capacity or 0
        self.active: list[_Slot] = []          # slots 0..n-1 of the cache, in use
        self._index: dict[str, int] = {}
        self._waiting: deque[_Request] = deque()
        self._root_tokens: list[int] | None = None
        self._head_slices: tuple[torch.Tensor, ...] | None = None
        self.stats = EngineStats()

    # -- requests ---------------------------------------------------------------------------

    @torch.inference_mode()
    def submit(self, key: str, tokens: list[int], max_new_tokens: int, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None) -> None:
        if not tokens:
            raise ValueError("empty request")
        if self.context_length and len(tokens) + max_new_tokens > self.context_length:
            raise ValueError(f"a conversation of {len(tokens)} tokens plus max_new_tokens {max_new_tokens} "
                             f"exceeds the model's context of {self.context_length}")
        request = _Request(key, list(tokens), max_new_tokens, temperature, top_p, seed)
        if key in self._index:
            slot = self.active[self._index[key]]
            if slot.state != "done":
                raise ValueError(f"request '{key}' is still running")
            self._start(slot, request, _common_prefix(slot.tokens, request.tokens))
        else:
            self._waiting.append(request)

    @torch.inference_mode()
    def release(self, key: str) -> None:
        """Frees the slot of a finished conversation (the last slot moves into it, so slots in use
        stay 0..n-1 and each decode step works on one contiguous view of the cache)."""
        index = self._index.pop(key, None)
        if index is None:
            self._waiting = deque(r for r in self._waiting if r.key != key)
            return
        last = len(self.active) - 1
        if index != last:
            moved = self.active[last]
            self.cache.copy(last, index, len(moved.tokens))
            self.active[index] = moved
            self._index[moved.key] = index
        self.active.pop()

    @property
    def busy(self) -> bool:
        return bool(self._waiting) or any(s.state in ("prefill", "decode") for s in self.active)

    def _start(self, slot: _Slot, request: _Request, reusable: int) -> None:
        reuse = min(reusable, len(request.tokens) - 1)     # at least one id must run to give logits
        slot.tokens = slot.tokens[:reuse]
        slot.lookup, slot.indexed = {}, 0
        slot.pending = request.tokens[reuse:]
        slot.root_shared = min(slot.root_shared, reuse)
        slot.generated = []
        slot.request = request
        slot.reused = reuse
        slot.state = "prefill"
        slot.generator = None
        if request.temperature > 0:
            slot.generator = torch.Generator(device="cpu")
            slot.generator.manual_seed(request.seed if request.seed is not None else torch.seed())
        self._ensure_capacity(len(request.tokens) + request.max_new_tokens)

    def _admit(self) -> None:
        while self._waiting and len(self.active) >= self.slots:
            # Full: a conversation whose turn is over but that was neither continued nor released
            # gives up its slot (if it comes back, it starts afresh from the root).
            idle = next((s.key for s in self.active if s.state == "done"), None)
            if idle is None:
                break
            self.release(idle)
        while self._waiting and len(self.active) < self.slots:
            request = self._waiting.popleft()
            slot = _Slot(key=request.key, fresh=True)
            self._index[request.key] = len(self.active)
            self.active.append(slot)
            self._start(slot, request, 0)

    def _share_root(self, rows: list[int]) -> None:
        """New conversations start from the root: the keys and values of the first conversation's
        prompt, as far as theirs matches it (the system prompt and few-shot turns)."""
        for i in rows:
            s = self.active[i]
            if not s.fresh:
                continue
            s.fresh = False
            reuse = min(_common_prefix(self._root_tokens, s.pending), len(s.pending) - 1)
            s.root_shared = reuse
            if reuse > 0:
                self.cache.load_root(i, reuse)
                s.tokens, s.pending, s.reused = s.pending[:reuse], s.pending[reuse:], reuse

    def _ensure_capacity(self, need: int) -> None:
        need = -(-max(need, self.capacity_hint) // 256) * 256
        if self.cache is None:
            self.cache = SlotCache(slots=self.slots, capacity=need, **self._layout)
        elif need > self.cache.capacity:
            self.cache.grow(max(need, -(-int(self.cache.capacity * 1.5) // 256) * 256))

    # -- the loop -----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[tuple[str, EngineResult]]:
        """Admits waiting requests, encodes what new requests need, and decodes one token for
        every conversation in flight. Returns the turns that ended."""
        self._admit()
        finished: list[tuple[str, EngineResult]] = []
        prefill = [i for i, s in enumerate(self.active) if s.state == "prefill"]
        if prefill and self._root_tokens is None:
            # The first conversation goes alone and becomes the root the others start from.
            first = next((i for i in prefill if self.active[i].fresh), prefill[0])
            self.active[first].fresh = False
            self._prefill([first], finished)
            self._root_tokens = list(self.active[first].tokens)
            self.active[first].root_shared = len(self._root_tokens)
            self.cache.save_root(first, len(self._root_tokens))
            prefill.remove(first)
        self._share_root(prefill)
        for group in self._prefill_groups(prefill):
            self._prefill(group, finished)
        if any(s.state == "decode" for s in self.active):
            self._decode(finished)
        return finished

    def _prefill_groups(self, rows: list[int]) -> list[list[int]]:
        rows = sorted(rows, key=lambda i: len(self.active[i].pending))
        groups: list[list[int]] = []
        for i in rows:
            n = len(self.active[i].pending)
            if groups:
                group = groups[-1]
                shortest = len(self.active[group[0]].pending)
                if n <= self.PREFILL_SPREAD * shortest + 8 and n * (len(group) + 1) <= self.PREFILL_TOKENS:
                    group.append(i)
                    continue
            groups.append([i])
        return groups

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, rows: slice | torch.Tensor,
                 slots: list[_Slot], keep: list[int] | None = None) -> torch.Tensor:
        """Runs the model on `input_ids` [batch, q], token j of row b at position positions[b, j],
        attending to every earlier position of its own slot; returns the last position's logits
        [batch, vocab], or with `keep` (batch rows) every position's, [len(keep), q, vocab]."""
        shared = min(s.root_shared for s in slots) if self.cache.root else 0
        self.cache.bind(rows, positions, int(positions.max()) + 1, shared)
        _bound.cache = self.cache
        try:
            hidden = self.model.model(input_ids=input_ids, position_ids=positions, past_key_values=self.cache,
                                      use_cache=True).last_hidden_state
        finally:
            _bound.cache = None
        if keep is None:
            return self._logits(hidden[:, -1, :]).float()
        kept = hidden[keep]
        return self._logits(kept.reshape(-1, kept.shape[-1])).float().view(*kept.shape[:2], -1)

    # A float32 output projection in slices of this many vocabulary rows: one [rows, hidden] ×
    # [hidden, 49k] product runs at a fraction of the speed of the same work in slices (26 against
    # 41 ms at 16 rows for SmolLM2's head on this CPU), and each logit is the same dot product.
    HEAD_SLICE = 1024

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.model.get_output_embeddings()
        if not isinstance(head, torch.nn.Linear):        # cai.backends.quant's layers: their own kernel
            return head(hidden)
        if self._head_slices is None:
            self._head_slices = head.weight.split(self.HEAD_SLICE)
        logits = torch.cat([torch.nn.functional.linear(hidden, w) for w in self._head_slices], dim=-1)
        return logits + head.bias if head.bias is not None else logits

    def _prefill(self, group: list[int], finished: list) -> None:
        slots = [self.active[i] for i in group]
        width = max(len(s.pending) for s in slots)
        self._ensure_capacity(max(len(s.tokens) for s in slots) + width)
        ids, positions = [], []
        for s in slots:
            start, n = len(s.tokens), len(s.pending)
            # Padding goes first, so every row's last real id is the last column; pad ids are
            # written past the row's real end, where no real query looks.
            ids.append([self.pad_id] * (width - n) + s.pending)
            positions.append(list(range(start + n, start + width)) + list(range(start, start + n)))
        logits = self._forward(torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device),
                               torch.tensor(group, device=self.device), slots)
        for s in slots:
            self.stats.prefill_computed += len(s.pending)
            self.stats.prefill_reused += s.reused
            s.tokens = s.tokens + s.pending
            s.pending = []
        self._advance(group, logits, finished)

    def _decode(self, finished: list) -> None:
        n = len(self.active)
        rows = [i for i, s in enumerate(self.active) if s.state == "decode"]
        # Drafts never grow the cache: every row's columns must fit in the positions it has.
        room = self.cache.capacity - max(len(s.tokens) for s in self.active) - 1
        drafts = self._drafts(rows, n) if room > 0 else {}
        drafts = {i: d[:room] for i, d in drafts.items()}
        width = 1 + max((len(d) for d in drafts.values()), default=0)
        self.stats.decode_steps += 1
        # Rows carry their last id and their draft, padded on the right: a pad's key and value land
        # past the row's real end, where no query looks and the next real id overwrites them.
        ids = []
        for i, s in enumerate(self.active):
            row = ([s.generated[-1]] + drafts.get(i, [])) if s.state == "decode" else []
            ids.append(row + [self.pad_id] * (width - len(row)))
        positions = torch.tensor([[len(s.tokens) + j for j in range(width)] for s in self.active], device=self.device)
        logits = self._forward(torch.tensor(ids, device=self.device), positions, slice(0, n), self.active, keep=rows)
        plain = [k for k, i in enumerate(rows) if i not in drafts]
        first = logits[:, 0] if len(plain) == len(rows) else logits[plain, 0]
        picks = dict(zip((rows[k] for k in plain), self._pick(first, [self.active[rows[k]] for k in plain])))
        greedy = logits.argmax(dim=-1).tolist() if drafts else []
        for k, i in enumerate(rows):
            s = self.active[i]
            s.tokens.append(s.generated[-1])
            if i in picks:
                self._accept(s, picks[i], finished)
                continue
            draft = drafts[i]
            self.stats.drafted += len(draft)
            for j, token in enumerate(greedy[k]):
                if not self._accept(s, token, finished) or j >= len(draft) or token != draft[j]:
                    break
                # the model agrees with the draft: that id's key and value, computed in this
                # forward, are the conversation's own
                s.tokens.append(token)
                self.stats.accepted += 1

    def _drafts(self, rows: list[int], n: int) -> dict[int, list[int]]:
        """Prompt-lookup drafts for greedy rows, cut to the width that keeps padding in check."""
        if not self.draft or not rows:
            return {}
        drafts = {}
        for i in rows:
            s = self.active[i]
            if s.request.temperature > 0 or len(s.tokens) < 2:
                continue
            # index every pair of ids whose continuation is known: (tokens[j-1], tokens[j]) → j
            tokens = s.tokens
            for j in range(max(s.indexed, 1), len(tokens) - 1):
                s.lookup[(tokens[j - 1], tokens[j])] = j
            s.indexed = max(s.indexed, len(tokens) - 1)
            end = s.lookup.get((tokens[-1], s.generated[-1]))
            if end is None:
                continue
            # what followed that pair then; one forward yields the draft plus one id, so no more
            # than the turn has left
            draft = tokens[end + 1:end + 1 + self.DRAFT_MAX]
            if len(draft) < self.DRAFT_MAX:
                draft.append(s.generated[-1])
            draft = draft[:s.request.max_new_tokens - len(s.generated) - 1]
            if draft:
                drafts[i] = draft
        # An accepted id saves its share of a step (STEP_COST / n columns) and costs nothing extra
        # (it is computed now instead of later); every other extra column costs one column. The
        # acceptance rate is this run's so far (from a prior of 80%).
        rate = (self.stats.accepted + 8) / (self.stats.drafted + 10)
        gain = 1 + self.DRAFT_STEP_COST / n
        size = max((k for k in range(1, self.DRAFT_MAX + 1)
                    if rate * sum(min(len(d), k) for d in drafts.values()) * gain >= n * k), default=0)
        return {i: d[:size] for i, d in drafts.items()} if size else {}

    def _advance(self, rows: list[int], logits: torch.Tensor, finished: list) -> None:
        picks = self._pick(logits, [self.active[i] for i in rows])
        for i, token in zip(rows, picks):
            self._accept(self.active[i], token, finished)

    def _accept(self, s: _Slot, token: int, finished: list) -> bool:
        """Appends a generated id to the row's turn; False when that ended the turn."""
        s.generated.append(token)
        stop = token in self.stop_ids
        if stop or len(s.generated) >= s.request.max_new_tokens:
            s.state = "done"
            finished.append((s.key, EngineResult(
                tokens=list(s.generated), finish_reason="stop" if stop else "length",
                prompt_tokens=len(s.request.tokens), reused_tokens=s.reused)))
            return False
        s.state = "decode"
        return True

    @staticmethod
    def _pick(logits: torch.Tensor, slots: list[_Slot]) -> list[int]:
        picks = logits.argmax(dim=-1).tolist()
        for row, s in enumerate(slots):
            r = s.request
            if r.temperature <= 0:
                continue
            probs = torch.softmax(logits[row] / r.temperature, dim=-1)
            if r.top_p < 1.0:
                sorted_probs, order = torch.sort(probs, descending=True)
                drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > r.top_p
                sorted_probs[drop] = 0
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            picks[row] = int(torch.multinomial(probs, 1, generator=s.generator))
        return picks
