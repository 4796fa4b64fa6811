"""A continuous-batching decode engine over a transformers causal LM: the scheduler (requests,
slots, admission, prefill grouping, the decode loop and sampling).

What makes it fast on a CPU (and sound on a GPU):
  * a static per-slot KV cache (kv_cache.py), written in place: no step ever copies the cache;
  * continuous batching: a conversation whose turn ends leaves the decode batch at once and the
    next request takes its place, so batches stay full rather than waiting for the longest;
  * prefix reuse: a request is matched token by token against what its slot already holds (the
    previous turn of the same conversation) or, for a new conversation, against the first
    conversation seen (the shared system prompt and few-shot turns); only the part that differs
    is encoded, and the shared part is stored once, never copied into the slots;
  * packed forwards: the rows' new ids run as one sequence, so no padding goes through the
    linear layers; a step's decode rows and the turns waiting to be encoded share one forward;
  * cascade attention (attention.py): the shared root prefix is read once for all rows, each
    row's own positions by a native kernel (kernels.py) or PyTorch's flash kernel;
  * prompt-lookup drafts for greedy turns (drafting.py), checked in the same forward.

The engine speaks token ids only: the HF backend owns the tokenizer and the chat template. It
drives the model's own forward (so rotary embeddings, norms and MLPs are the model's), handing it
this cache (as `cache`, or `past_key_values` before transformers renamed it) and switching the
model to `cascade_attention`, which takes its mask from the cache; `supports()` says which
architectures are known to follow that contract."""

from __future__ import annotations

import inspect
import itertools
from collections import deque

import torch

from cai.backends import attention, drafting, kernels
from cai.backends.attention import ATTENTION, SUPPORTED_MODEL_TYPES, cascade_attention, supports
from cai.backends.kv_cache import SlotCache, kv_bytes_per_token, kv_layout
from cai.backends.slots import EngineResult, EngineStats, Request, Slot

__all__ = ["ATTENTION", "SUPPORTED_MODEL_TYPES", "Engine", "EngineResult", "EngineStats", "SlotCache",
           "cascade_attention", "kv_bytes_per_token", "kv_layout", "supports"]


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

    # Prompt-lookup drafting (greedy turns only; see drafting.py): at most DRAFT_MAX ids a draft,
    # and a step's fixed cost in ids' worth of compute, which decides how long a draft is worth.
    DRAFT_MAX = drafting.DRAFT_MAX
    DRAFT_STEP_COST = drafting.DRAFT_STEP_COST

    def __init__(self, model, slots: int, stop_ids: list[int], context_length: int | None = None,
                 draft: bool = True, capacity: int | None = None, kv_dtype: torch.dtype | None = None):
        """`capacity`: positions a slot needs for the longest conversation expected, where known;
        the cache is then allocated once at that size instead of growing (a grow copies the whole
        cache) as longer conversations arrive. `kv_dtype`: the dtype keys and values are kept in,
        where not the model's (bfloat16 beside the CPU's bf16 linears: half the bytes each decode
        step streams, and the root's product runs on the bf16 units)."""
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
        kv_dtype = kv_dtype or dtype
        native = (kernels.decode_attention() if self.device.type == "cpu" and dtype == torch.float32
                  and kv_dtype in kernels.KV_DTYPES else None)
        self._layout = dict(kv_layout(model.config), dtype=kv_dtype, device=self.device, native=native)
        self.cache: SlotCache | None = None
        self.capacity_hint = capacity or 0
        self.active: list[Slot] = []          # slots 0..n-1 of the cache, in use
        self._index: dict[str, int] = {}
        self._waiting: deque[Request] = deque()
        self._root_tokens: list[int] | None = None
        self._root_cache: SlotCache | None = None      # where the first conversation's prompt was encoded
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
        request = Request(key, list(tokens), max_new_tokens, temperature, top_p, seed)
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
            self.cache.copy(last, index, moved.stored)
            self.active[index] = moved
            self._index[moved.key] = index
        self.active.pop()

    def partial(self) -> list[tuple[str, list[int]]]:
        """(key, ids generated so far) of each turn still being decoded (ids, not text: the
        engine knows no tokenizer). The lists are the engine's own: read, do not change."""
        return [(s.key, s.generated) for s in self.active if s.state == "decode"]

    @property
    def busy(self) -> bool:
        return bool(self._waiting) or any(s.state in ("prefill", "decode") for s in self.active)

    def _start(self, slot: Slot, request: Request, reusable: int) -> None:
        reuse = min(reusable, len(request.tokens) - 1)     # at least one id must run to give logits
        slot.tokens = slot.tokens[:reuse]
        slot.lookup, slot.indexed = {}, 0
        slot.agreed = slot.disagreed = 0
        slot.pending = request.tokens[reuse:]
        # the slot holds positions from root_shared on; a turn that differs inside the root's part
        # takes less of it and encodes the rest (stored from the slot's start)
        slot.root_shared = min(slot.root_shared, reuse)
        slot.generated = []
        slot.request = request
        slot.reused = reuse
        slot.state = "prefill"
        slot.generator = None
        if request.temperature > 0:
            slot.generator = torch.Generator(device=self.device)   # multinomial samples on the model's device
            slot.generator.manual_seed(request.seed if request.seed is not None else torch.seed())
        if not slot.fresh:                  # a new conversation's share of the root is not known yet
            self._ensure_room([slot])

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
            slot = Slot(key=request.key, fresh=True)
            self._index[request.key] = len(self.active)
            self.active.append(slot)
            self._start(slot, request, 0)

    def _share_root(self, rows: list[int], rooted: list[Slot]) -> None:
        """New conversations start from the root: the keys and values of the first conversation's
        prompt, as far as theirs matches it (the system prompt and few-shot turns). They read
        that part from the root itself; their slots hold only what follows. `rooted`: slots whose
        share is already known that need their room too (the root's own conversation)."""
        for i in rows:
            s = self.active[i]
            if not s.fresh:
                continue
            s.fresh = False
            reuse = min(_common_prefix(self._root_tokens, s.pending), len(s.pending) - 1)
            s.root_shared = reuse
            s.tokens, s.pending, s.reused = s.pending[:reuse], s.pending[reuse:], reuse
            rooted.append(s)
        if rooted:
            self._ensure_room(rooted)

    def _ensure_room(self, slots: list[Slot]) -> None:
        """A cache with room for these slots' own positions through their whole turns. The first
        one is sized from the pipeline's bound on a conversation (`capacity`) less the root
        share these slots have, so the cache is allocated once."""
        need = max(len(s.request.tokens) + s.request.max_new_tokens - s.root_shared for s in slots)
        if self.cache is None:
            hint = self.capacity_hint - min(s.root_shared for s in slots)
            self.cache = SlotCache(slots=self.slots, capacity=-(-max(need, hint) // 256) * 256, **self._layout)
            if self._root_cache is not None:
                self.cache.take_root(self._root_cache, len(self._root_tokens))
        elif need > self.cache.capacity:
            self.cache.grow(max(-(-need // 256) * 256, -(-int(self.cache.capacity * 1.5) // 256) * 256),
                            [s.stored for s in self.active])

    # -- the loop -----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[tuple[str, EngineResult]]:
        """Admits waiting requests, encodes what new requests need, and decodes one token for
        every conversation in flight. Returns the turns that ended."""
        self._admit()
        finished: list[tuple[str, EngineResult]] = []
        prefill = [i for i, s in enumerate(self.active) if s.state == "prefill"]
        rooted = []
        if prefill and self._root_tokens is None:
            # The first conversation goes alone, into a cache of its own, and its prompt becomes
            # the root the others start from; its slot holds what follows, like every other.
            first = next((i for i in prefill if self.active[i].fresh), prefill[0])
            s = self.active[first]
            s.fresh = False
            self._root_cache = SlotCache(slots=1, capacity=len(s.tokens) + len(s.pending), **self._layout)
            self._run([], [first], finished, cache=self._root_cache)
            self._root_tokens = list(s.tokens)
            s.root_shared = len(self._root_tokens)
            if self.cache is not None:
                self.cache.take_root(self._root_cache, len(self._root_tokens))
            prefill.remove(first)
            rooted.append(s)
        self._share_root(prefill, rooted)
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

    def _forward(self, rows: list[int], ids: list[list[int]], every: int = 0,
                 cache: SlotCache | None = None) -> torch.Tensor:
        """Runs the model on each row's new ids (slot rows[b]'s ids go at the positions after those
        it holds), all rows packed into one sequence, each id attending to every earlier position of
        its own conversation. Returns logits [k, vocab]: those of every id of the first `every`
        rows, then those of the last id of each other row. `cache`: another cache to run in (the
        root's, whose one slot is the row)."""
        slots = [self.active[i] for i in rows]
        counts = [len(x) for x in ids]
        positions = [len(s.tokens) + j for s, n in zip(slots, counts) for j in range(n)]
        cache = cache or self.cache
        cache.bind(rows if cache is self.cache else list(range(len(rows))), counts, positions,
                   [s.root_shared for s in slots])
        packed = torch.tensor([[t for x in ids for t in x]], device=self.device)
        attention.bound.cache = cache
        try:
            hidden = self.model.model(input_ids=packed, position_ids=cache.positions[None], use_cache=True,
                                      **{self._cache_argument: cache}).last_hidden_state[0]
        finally:
            attention.bound.cache = None
        if every < len(rows):
            # offsets from the lists at hand: slicing by a device tensor would wait on the device
            starts = list(itertools.accumulate(counts, initial=0))
            last = torch.tensor([starts[b + 1] - 1 for b in range(every, len(rows))], device=hidden.device)
            hidden = torch.cat([hidden[:starts[every]], hidden[last]])
        self.stats.ids += len(positions)
        self.stats.head_rows += hidden.shape[0]
        self.stats.attended += sum(positions) + len(positions)
        return self._logits(hidden).float()

    # A float32 output projection in slices of this many vocabulary rows: one [rows, hidden] ×
    # [hidden, 49k] product runs at a fraction of the speed of the same work in slices (26 against
    # 41 ms at 16 rows for SmolLM2's head on this CPU), and each logit is the same dot product.
    HEAD_SLICE = 1024

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.model.get_output_embeddings()
        if not isinstance(head, torch.nn.Linear):        # cai.backends.quant's layers: their own kernel
            return head(hidden)
        if self._head_slices is None:          # (on a GPU one product is the fast way)
            self._head_slices = head.weight.split(self.HEAD_SLICE) if self.device.type == "cpu" else (head.weight,)
        logits = torch.cat([torch.nn.functional.linear(hidden, w) for w in self._head_slices], dim=-1)
        return logits + head.bias if head.bias is not None else logits

    def _run(self, decode: list[int], prefill: list[int], finished: list, cache: SlotCache | None = None) -> None:
        """One forward: every decode row's last id (and its draft), every prefill row's pending ids."""
        drafts = self._drafts(decode, len(decode) + len(prefill)) if decode else {}
        pending = [self.active[i] for i in prefill]
        # Each decode row brings its last id and its draft: one id more than it has accepted.
        ids = [[self.active[i].generated[-1]] + drafts.get(i, []) for i in decode] + [s.pending for s in pending]
        logits = self._forward(decode + prefill, ids, every=len(decode), cache=cache)
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
        greedy = logits.argmax(dim=-1).tolist() if drafts else None      # (one pass over the logits)
        known = None if greedy is None else [greedy[starts[k]] for k in plain]
        picks = dict(zip((rows[k] for k in plain), self._pick(first, [self.active[rows[k]] for k in plain], known)))
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
        """Prompt-lookup drafts (drafting.py) for greedy rows, as long as they are worth their
        columns; `sharing`: how many rows share the step."""
        if not self.draft:
            return {}
        worth = 1 + self.DRAFT_STEP_COST / sharing
        drafts = {}
        for i in rows:
            s = self.active[i]      # the draft's room: the positions the slot holds, past its root share
            draft = drafting.propose(s, worth, self.DRAFT_MAX, self.cache.capacity + s.root_shared)
            if draft:
                drafts[i] = draft
        return drafts

    def _advance(self, rows: list[int], logits: torch.Tensor, finished: list) -> None:
        picks = self._pick(logits, [self.active[i] for i in rows])
        for i, token in zip(rows, picks):
            self._accept(self.active[i], token, finished)

    def _accept(self, s: Slot, token: int, finished: list) -> bool:
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
    def _pick(logits: torch.Tensor, slots: list[Slot], greedy: list[int] | None = None) -> list[int]:
        """Each row's next id: the argmax (`greedy`, where known) or a sample."""
        picks = logits.argmax(dim=-1).tolist() if greedy is None else greedy
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
