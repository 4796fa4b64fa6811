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
  * packed forwards: the rows' new ids run as one sequence, so no padding goes through the
    linear layers; a step's decode rows and the turns waiting to be encoded share one forward;
  * attention over each row's own positions by a native kernel (kernels.py) that reads each row
    to its own length; rows encoding a long turn go, padded and grouped by length, through
    PyTorch's flash kernel.

The engine speaks token ids only: the HF backend owns the tokenizer and the chat template. It
drives the model's own forward (so rotary embeddings, norms and MLPs are the model's), handing it
this cache (as `cache`, or `past_key_values` before transformers renamed it) and switching the
model to `cascade_attention`, which takes its mask from the cache; `supports()` says which
architectures are known to follow that contract."""

from __future__ import annotations

import inspect
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
    rejected: int = 0            # drafts cut short where the model disagreed


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
    agreed: int = 0                                      # this turn's draft ids the model agreed with
    disagreed: int = 0                                   # and drafts it cut short


class SlotCache:
    """Per-layer key/value tensors of shape [slots, kv_heads, capacity, head_dim], plus the root
    prefix (the first conversation's prompt) once per layer. Every forward runs its rows' new ids
    packed into one sequence (no padding goes through the model's linear layers). Before it,
    `bind` says which slots take part, how many ids each brings and at which positions, and how
    much of the root every row shares; the model then calls `update` once per layer (the one Cache
    method its forward uses) and the engine's attention function reads the rest from here."""

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
        self.native = native                # kernels.decode_attention() or None
        # the forward being run (see `bind`)
        self.slots: torch.Tensor | None = None        # [rows] slot of each row
        self.offsets: torch.Tensor | None = None      # [rows + 1] row b's ids are offsets[b]:offsets[b+1]
        self.positions: torch.Tensor | None = None    # [ids] cache position of each id
        self._id_slots: torch.Tensor | None = None    # [ids] slot of each id
        self.native_rows = 0                          # leading rows the native kernel takes
        self.first_padded = 0                         # first id of the rows PyTorch's kernels take
        # for PyTorch's kernels: those rows' ids laid out padded, [rows, width], and the mask
        self.pad_index: torch.Tensor | None = None    # [rows, width] id at each place (pads repeat the last)
        self.id_row: torch.Tensor | None = None       # [ids] row of each id
        self.id_column: torch.Tensor | None = None    # [ids] place of each id in its row
        self.mask: torch.Tensor | None = None         # [rows, width, own positions]
        self._kv_len = 0

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

    def bind(self, slots: list[int], counts: list[int], positions: list[int], shared: int) -> None:
        """Row b of this forward is slot slots[b] and brings counts[b] ids, packed in row order;
        `positions`: where each id's key and value go; `shared`: how many leading positions
        every row takes from the root. Leading rows of at most NATIVE_MAX_IDS ids (decode rows
        come first) go to the native kernel where there is one; the rest to PyTorch's kernels."""
        device = self.keys[0].device
        self.slots = torch.tensor(slots, device=device)
        counts_t = torch.tensor(counts, device=device)
        self.offsets = torch.nn.functional.pad(counts_t.cumsum(0), (1, 0))
        self.positions = torch.tensor(positions, device=device)
        self._id_slots = self.slots.repeat_interleave(counts_t)
        self.shared = shared
        short = 0
        while self.native is not None and short < len(counts) and counts[short] <= self.NATIVE_MAX_IDS:
            short += 1
        self.native_rows = short
        self.first_padded = sum(counts[:short])       # ids from here on go to PyTorch's kernels
        if short == len(counts):
            self.pad_index = None
            return
        # PyTorch's kernels want rows padded to one width: row b's j-th id at [b, j]
        rest = counts_t[short:]
        rows, width = len(rest), int(rest.max())
        starts = self.offsets[short:-1]
        self.id_row = torch.arange(rows, device=device).repeat_interleave(rest)
        self.id_column = torch.arange(self.first_padded, len(positions), device=device) - starts[self.id_row]
        column = torch.minimum(torch.arange(width, device=device)[None, :], rest[:, None] - 1)
        self.pad_index = starts[:, None] + column                                     # [rows, width]
        self._kv_len = int(self.positions[self.first_padded:].max()) + 1
        keys = torch.arange(shared, self._kv_len, device=device)
        allowed = keys[None, None, :] <= self.positions[self.pad_index][:, :, None]    # [rows, width, kv]
        self.mask = torch.zeros(allowed.shape, dtype=self.keys[0].dtype, device=device)
        self.mask.masked_fill_(~allowed, float("-inf"))

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Writes the forward's keys and values [1, kv_heads, ids, dim] into their slots and
        returns the layer's whole cache (attention reads each row's part from it)."""
        for store, new in ((self.keys, key_states), (self.values, value_states)):
            store[layer_idx][self._id_slots, :, self.positions] = new[0].transpose(0, 1)
        return self.keys[layer_idx], self.values[layer_idx]

    def padded_part(self, keys: torch.Tensor) -> torch.Tensor:
        """The own positions [shared, kv_len) of the rows PyTorch's kernels take: [rows, kv_heads, own, dim]."""
        return keys[self.slots[self.native_rows:], :, self.shared:self._kv_len]

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
    function. The root part is one product for all ids at once (every row shares those keys), so
    its keys and values are read once per layer instead of once per row; the two parts are joined
    under one softmax through their log-sum-exps. `query` [1, heads, ids, dim] holds the packed
    ids of every row; `key`/`value` are what `SlotCache.update` returned."""
    cache: SlotCache = _bound.cache
    _, q_heads, n_ids, dim = query.shape
    kv_heads = cache.keys[0].shape[1]
    group = q_heads // kv_heads
    scale = scaling if scaling is not None else dim ** -0.5
    # Query heads h*group … h*group+group-1 read kv head h (transformers' repeat_kv order), so a
    # kv head's queries are one block of group*ids rows.
    queries = query[0].reshape(kv_heads, group, n_ids, dim)
    part = _flash if query.device.type == "cpu" and _flash is not None else _plain_part
    out = lse = None
    if cache.native_rows:
        out, lse = cache.native(queries, key, value, cache.slots[:cache.native_rows],
                                cache.offsets[:cache.native_rows + 1], cache.positions, cache.shared, scale)
    if cache.pad_index is not None:
        # PyTorch's kernels want rows padded to one width: lay the ids out so, run, and pick them back
        rows, width = cache.pad_index.shape
        padded = queries[:, :, cache.pad_index].permute(2, 0, 1, 3, 4).reshape(rows, kv_heads, group * width, dim)
        mask = cache.mask[:, None, None].expand(rows, 1, group, width, -1).reshape(rows, 1, group * width, -1)
        o, l = part(padded, cache.padded_part(key), cache.padded_part(value), mask, scale)
        o = o.view(rows, kv_heads, group, width, dim)[cache.id_row, :, :, cache.id_column].permute(1, 2, 0, 3)
        l = l.view(rows, kv_heads, group, width)[cache.id_row, :, :, cache.id_column].permute(1, 2, 0)
        if out is None:
            out, lse = o, l
        else:
            out[:, :, cache.first_padded:], lse[:, :, cache.first_padded:] = o, l
    if cache.shared:
        root_k, root_v = cache.root[module.layer_idx]
        flat = queries.reshape(1, kv_heads, group * n_ids, dim)
        common, common_lse = part(flat, root_k[None, :, :cache.shared], root_v[None, :, :cache.shared], None, scale)
        common, common_lse = common.view(kv_heads, group, n_ids, dim), common_lse.view(kv_heads, group, n_ids)
        top = torch.maximum(lse, common_lse)
        own_w, common_w = (lse - top).exp_(), (common_lse - top).exp_()
        out = (out * own_w[..., None] + common * common_w[..., None]) / (own_w + common_w)[..., None]
    return out.reshape(q_heads, n_ids, dim).transpose(0, 1)[None], None


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
    # them all, and every id the model agrees with saves the row a decode step (the small model
    # repeats itself and its revisions copy its answers). Ids are packed, so a draft costs only its
    # own columns; it is worth them where a step's fixed cost (reading the weights and the
    # attention's keys, per-op overhead: DRAFT_STEP_COST ids' worth of compute, measured on a
    # 2-core CPU as ~60 ms against ~5 ms an id) is shared among few rows. See `_draft_length`.
    DRAFT_MAX = 8
    DRAFT_STEP_COST = 12

    def __init__(self, model, slots: int, stop_ids: list[int], context_length: int | None = None,
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
        # transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name warns,
        # and goes in 5.40); take whichever this version's forward has
        accepted = inspect.signature(model.model.forward).parameters
        self._cache_argument = "cache" if "cache" in accepted else "past_key_values"
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
        slot.agreed = slot.disagreed = 0
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
            self._run([], [first], finished)
            self._root_tokens = list(self.active[first].tokens)
            self.active[first].root_shared = len(self._root_tokens)
            self.cache.save_root(first, len(self._root_tokens))
            prefill.remove(first)
        self._share_root(prefill)
        groups = self._prefill_groups(prefill)
        for group in groups[:-1]:
            self._run([], group, finished)
        # the decode step carries the last prefill group: one forward's fixed cost instead of two
        decode = [i for i, s in enumerate(self.active) if s.state == "decode"]
        if decode or groups:
            self._run(decode, groups[-1] if groups else [], finished)
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

    def _forward(self, rows: list[int], ids: list[list[int]], every: int = 0) -> torch.Tensor:
        """Runs the model on each row's new ids (slot rows[b]'s ids go at the positions after those
        it holds), all rows packed into one sequence, each id attending to every earlier position of
        its own conversation. Returns logits [k, vocab]: those of every id of the first `every`
        rows, then those of the last id of each other row."""
        slots = [self.active[i] for i in rows]
        counts = [len(x) for x in ids]
        positions = [len(s.tokens) + j for s, n in zip(slots, counts) for j in range(n)]
        shared = min(s.root_shared for s in slots) if self.cache.root else 0
        self.cache.bind(rows, counts, positions, shared)
        packed = torch.tensor([[t for x in ids for t in x]], device=self.device)
        _bound.cache = self.cache
        try:
            hidden = self.model.model(input_ids=packed, position_ids=self.cache.positions[None], use_cache=True,
                                      **{self._cache_argument: self.cache}).last_hidden_state[0]
        finally:
            _bound.cache = None
        offsets = self.cache.offsets
        if every < len(rows):
            hidden = torch.cat([hidden[:offsets[every]], hidden[offsets[every + 1:] - 1]])
        return self._logits(hidden).float()

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

    def _run(self, decode: list[int], prefill: list[int], finished: list) -> None:
        """One forward: every decode row's last id (and its draft), every prefill row's pending ids."""
        drafts = self._drafts(decode, len(decode) + len(prefill)) if decode else {}
        pending = [self.active[i] for i in prefill]
        if pending:
            self._ensure_capacity(max(len(s.tokens) + len(s.pending) for s in pending))
        # Each decode row brings its last id and its draft: one id more than it has accepted.
        ids = [[self.active[i].generated[-1]] + drafts.get(i, []) for i in decode] + [s.pending for s in pending]
        logits = self._forward(decode + prefill, ids, every=len(decode))
        decoded = sum(len(x) for x in ids[:len(decode)])
        if decode:
            self._take_decoded(decode, drafts, logits[:decoded], finished)
        for s in pending:
            self.stats.prefill_computed += len(s.pending)
            self.stats.prefill_reused += s.reused
            s.tokens = s.tokens + s.pending
            s.pending = []
        if prefill:
            self._advance(prefill, logits[decoded:], finished)

    def _take_decoded(self, rows: list[int], drafts: dict[int, list[int]], logits: torch.Tensor, finished: list) -> None:
        """Each decode row's next id, and as many of its draft's as the model agreed with."""
        self.stats.decode_steps += 1
        starts = [0]
        for i in rows:
            starts.append(starts[-1] + 1 + len(drafts.get(i, [])))
        plain = [k for k, i in enumerate(rows) if i not in drafts]
        first = logits if len(plain) == len(rows) else logits[[starts[k] for k in plain]]
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
            for j, token in enumerate(greedy[starts[k]:starts[k + 1]]):
                if not self._accept(s, token, finished) or j >= len(draft):
                    break
                if token != draft[j]:
                    self.stats.rejected += 1
                    s.disagreed += 1
                    break
                # the model agrees with the draft: that id's key and value, computed in this
                # forward, are the conversation's own
                s.tokens.append(token)
                self.stats.accepted += 1
                s.agreed += 1

    def _drafts(self, rows: list[int], sharing: int) -> dict[int, list[int]]:
        """Prompt-lookup drafts for greedy rows, as long as they are worth their columns;
        `sharing`: how many rows share the step."""
        if not self.draft:
            return {}
        worth = 1 + self.DRAFT_STEP_COST / sharing
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
            # agreement per draft id, from the turn's own record (a revision that copies its answer
            # agrees far more often than a first answer does) and a prior of 90%
            rate = (s.agreed + 3.6) / (s.agreed + s.disagreed + 4)
            longest = self._draft_length(rate, worth)
            # what followed that pair then (up to the row's last id, not yet in `tokens`)
            draft = tokens[end + 1:end + 1 + longest]
            if len(draft) < longest:
                draft.append(s.generated[-1])
            # one forward yields the draft plus one id: no more than the turn has left, and never
            # past the cache's room (drafts do not grow it)
            draft = draft[:min(longest, s.request.max_new_tokens - len(s.generated) - 1,
                               self.cache.capacity - len(tokens) - 2)]
            if draft:
                drafts[i] = draft
        return drafts

    def _draft_length(self, rate: float, worth: float) -> int:
        """How many draft ids a row may bring. A draft's j-th id counts only if the model agreed
        with all before it: at `rate` of agreement per id, that is rate**j. An id that counts saves
        its row a later step, worth DRAFT_STEP_COST / rows ids of compute; one that does not costs
        its own; so the j-th id is worth bringing while rate**j * `worth` >= 1, `worth` being
        1 + DRAFT_STEP_COST / rows: long drafts when few rows share a step, short in a full batch."""
        length = 0
        while length < self.DRAFT_MAX and rate ** (length + 1) * worth >= 1:
            length += 1
        return length

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
