"""The engine's scheduler, over plain data (no model, no tensors): which requests hold the cache's
slots, how much of each prompt is already there, how big the cache must be, which rows run in
which forward, and what each forward's ids do to its rows.

  * admission: requests wait until a slot is free; a conversation whose turn is over but that
    was neither continued nor released gives up its slot to a waiting one (if it comes back, it
    starts afresh from the root);
  * prefix reuse: a turn is matched token by token against what its slot already holds (the
    previous turn of the same conversation) or, for a new conversation, against the root (the
    first conversation's prompt: the shared system prompt and few-shot turns), which is stored
    once and never copied into the slots; only the part that differs is encoded;
  * cache sizing: the cache is allocated once at the size the run's longest conversation needs
    (less the root's share), and grown only when a turn outgrows it;
  * forwards: turns waiting to be encoded go in groups of like length, and the last group
    shares a forward with the step's decode rows; greedy decode rows bring prompt-lookup drafts
    (drafting.py) where they are worth their columns.

What the storage must do is handed to the engine as `ops` (Allocate, Grow, Move), in order; the
forwards it plans are `Forward`s, and `complete` takes the ids the sampler picked for one."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from cai.backends import drafting
from cai.backends.slots import EngineRequest, EngineResult, EngineStats, Slot

PAGE = 256      # the cache's capacity is a multiple of this many positions


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _pages(n: int) -> int:
    return -(-n // PAGE) * PAGE


@dataclass(frozen=True)
class Allocate:
    """Allocate the cache: `capacity` positions a slot (it takes the root, where there is one)."""
    capacity: int


@dataclass(frozen=True)
class Grow:
    """Grow the cache to `capacity` positions a slot, keeping lengths[i] positions of slot i."""
    capacity: int
    lengths: list[int]


@dataclass(frozen=True)
class Move:
    """Slot `target` takes the first `length` stored positions of slot `source`."""
    source: int
    target: int
    length: int


@dataclass
class Forward:
    """One forward: `decode` rows bring their last id (and their draft, `drafts`), `prefill` rows
    their pending ids. Row b (of decode + prefill) brings ids[b], at positions starts[b] on, and
    reads its first bases[b] positions from the root."""
    decode: list[int]
    prefill: list[int]
    drafts: dict[int, list[int]] = field(default_factory=dict)
    ids: list[list[int]] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    bases: list[int] = field(default_factory=list)

    @property
    def rows(self) -> list[int]:
        return self.decode + self.prefill

    @property
    def decoded(self) -> int:
        """Logits rows of the decode rows (every id of theirs); the prefill rows' follow, one each."""
        return sum(len(x) for x in self.ids[:len(self.decode)])

    def decode_offsets(self) -> list[int]:
        """Where decode row k's logits start (and, at [k + 1], end)."""
        offsets = [0]
        for x in self.ids[:len(self.decode)]:
            offsets.append(offsets[-1] + len(x))
        return offsets


class Scheduler:
    """`submit` a conversation's token ids under a key (the same key again for its next turn, so
    the cache carries over), plan each step with `admit`, `root_row` and `forwards`, and
    `release` the key when the conversation is over. Slots in use are rows 0..n-1 of the cache."""

    # Prefill groups: at most this many tokens (rows × padded length) in one forward, and rows
    # whose lengths differ by more than this factor go to separate forwards.
    PREFILL_TOKENS = 4096
    PREFILL_SPREAD = 1.3

    # Prompt-lookup drafting (greedy turns only; see drafting.py): at most DRAFT_MAX ids a draft,
    # and a step's fixed cost in ids' worth of compute, which decides how long a draft is worth.
    DRAFT_MAX = drafting.DRAFT_MAX
    DRAFT_STEP_COST = drafting.DRAFT_STEP_COST

    def __init__(self, slots: int, stop_ids: list[int], context_length: int | None = None, draft: bool = True,
                 capacity: int | None = None, stats: EngineStats | None = None):
        """`capacity`: positions a slot needs for the longest conversation expected, where known;
        the cache is then allocated once at that size instead of growing (a grow copies the whole
        cache) as longer conversations arrive."""
        self.slots = slots
        self.stop_ids = set(stop_ids)
        self.context_length = context_length
        self.draft = draft
        self.capacity_hint = capacity or 0
        self.capacity = 0                     # the cache's positions a slot (0: not allocated yet)
        self.stats = stats or EngineStats()
        self.active: list[Slot] = []          # slots 0..n-1 of the cache, in use
        self._index: dict[str, int] = {}
        self._waiting: deque[EngineRequest] = deque()
        self.root_tokens: list[int] | None = None
        self.ops: list[Allocate | Grow | Move] = []     # the storage's work, in order (see take_ops)

    def take_ops(self) -> list[Allocate | Grow | Move]:
        """What the storage must do, in order, since the last call."""
        ops, self.ops = self.ops, []
        return ops

    # -- requests ---------------------------------------------------------------------------

    def submit(self, key: str, tokens: list[int], max_new_tokens: int, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None) -> None:
        if not tokens:
            raise ValueError("empty request")
        if self.context_length and len(tokens) + max_new_tokens > self.context_length:
            raise ValueError(f"a conversation of {len(tokens)} tokens plus max_new_tokens {max_new_tokens} "
                             f"exceeds the model's context of {self.context_length}")
        request = EngineRequest(key, list(tokens), max_new_tokens, temperature, top_p, seed)
        if key in self._index:
            slot = self.active[self._index[key]]
            if slot.state != "done":
                raise ValueError(f"request '{key}' is still running")
            self._start(slot, request, _common_prefix(slot.tokens, request.tokens))
        else:
            self._waiting.append(request)

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
            self.ops.append(Move(last, index, moved.stored))
            self.active[index] = moved
            self._index[moved.key] = index
        self.active.pop()

    def slot(self, key: str) -> Slot:
        return self.active[self._index[key]]

    def partial(self) -> list[tuple[str, list[int]]]:
        """(key, ids generated so far) of each turn still being decoded. The lists are the
        scheduler's own: read, do not change."""
        return [(s.key, s.generated) for s in self.active if s.state == "decode"]

    @property
    def busy(self) -> bool:
        return bool(self._waiting) or any(s.state in ("prefill", "decode") for s in self.active)

    def rows(self, state: str) -> list[int]:
        return [i for i, s in enumerate(self.active) if s.state == state]

    def _start(self, slot: Slot, request: EngineRequest, reusable: int) -> None:
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
        if not slot.fresh:                  # a new conversation's share of the root is not known yet
            self._ensure_room([slot])

    def admit(self) -> None:
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

    # -- the root ---------------------------------------------------------------------------

    def root_row(self) -> int | None:
        """The row whose prompt becomes the root, when none is yet and a turn waits to be encoded:
        it goes alone, into a cache of its own (then `root_encoded`)."""
        prefill = self.rows("prefill")
        if not prefill or self.root_tokens is not None:
            return None
        first = next((i for i in prefill if self.active[i].fresh), prefill[0])
        self.active[first].fresh = False
        return first

    def root_encoded(self, row: int) -> None:
        """Row `row`'s prompt, now encoded, is the root; its slot holds what follows, like every other."""
        s = self.active[row]
        self.root_tokens = list(s.tokens)
        s.root_shared = len(self.root_tokens)

    def _share_root(self, rows: list[int], rooted: list[Slot]) -> None:
        """New conversations start from the root, as far as theirs matches it (the system prompt
        and few-shot turns). They read that part from the root itself; their slots hold only what
        follows. `rooted`: slots whose share is already known that need their room too (the
        root's own conversation)."""
        for i in rows:
            s = self.active[i]
            if not s.fresh:
                continue
            s.fresh = False
            reuse = min(_common_prefix(self.root_tokens, s.pending), len(s.pending) - 1)
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
        if not self.capacity:
            hint = self.capacity_hint - min(s.root_shared for s in slots)
            self.capacity = _pages(max(need, hint))
            self.ops.append(Allocate(self.capacity))
        elif need > self.capacity:
            self.capacity = max(_pages(need), _pages(int(self.capacity * 1.5)))
            self.ops.append(Grow(self.capacity, [s.stored for s in self.active]))

    # -- forwards ---------------------------------------------------------------------------

    def forwards(self, root: int | None = None):
        """The step's forwards, planned one at a time (run each before asking for the next: a
        group just encoded decodes in the step's last forward): the turns waiting to be encoded
        in groups of like length, the last group with the decode rows. `root`: the row just
        encoded as the root this step."""
        prefill = [i for i in self.rows("prefill") if i != root]
        self._share_root(prefill, [self.active[root]] if root is not None else [])
        groups = self.prefill_groups(prefill)
        for group in groups[:-1]:
            yield self.prepare([], group)
        # the decode step carries the last prefill group: one forward's fixed cost instead of two
        decode = self.rows("decode")
        if decode or groups:
            yield self.prepare(decode, groups[-1] if groups else [])

    def prefill_groups(self, rows: list[int]) -> list[list[int]]:
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

    def prepare(self, decode: list[int], prefill: list[int]) -> Forward:
        """One forward: every decode row's last id (and its draft), every prefill row's pending ids."""
        drafts = self._drafts(decode, len(decode) + len(prefill)) if decode else {}
        # Each decode row brings its last id and its draft: one id more than it has accepted.
        ids = [[self.active[i].generated[-1]] + drafts.get(i, []) for i in decode] + \
              [self.active[i].pending for i in prefill]
        slots = [self.active[i] for i in decode + prefill]
        return Forward(decode, prefill, drafts, ids, [len(s.tokens) for s in slots], [s.root_shared for s in slots])

    def _drafts(self, rows: list[int], sharing: int) -> dict[int, list[int]]:
        """Prompt-lookup drafts (drafting.py) for greedy rows, as long as they are worth their
        columns; `sharing`: how many rows share the step."""
        if not self.draft:
            return {}
        worth = 1 + self.DRAFT_STEP_COST / sharing
        drafts = {}
        for i in rows:
            s = self.active[i]      # the draft's room: the positions the slot holds, past its root share
            draft = drafting.propose(s, worth, self.DRAFT_MAX, self.capacity + s.root_shared)
            if draft:
                drafts[i] = draft
        return drafts

    def complete(self, forward: Forward, picks: dict[int, int], greedy: list[int] | None,
                 encoded: list[int]) -> list[tuple[str, EngineResult]]:
        """What the forward's ids did: `picks`, each undrafted decode row's next id; `greedy`, the
        argmax at each of the decode rows' ids (where some brought a draft); `encoded`, each
        prefill row's first generated id. Returns the turns that ended."""
        finished: list[tuple[str, EngineResult]] = []
        if forward.decode:
            self._take_decoded(forward, picks, greedy, finished)
        for i in forward.prefill:
            s = self.active[i]
            self.stats.prefill_computed += len(s.pending)
            self.stats.prefill_reused += s.reused
            s.tokens = s.tokens + s.pending
            s.pending = []
        for i, token in zip(forward.prefill, encoded):
            self._accept(self.active[i], token, finished)
        return finished

    def _take_decoded(self, forward: Forward, picks: dict[int, int], greedy: list[int] | None,
                      finished: list) -> None:
        """Each decode row's next id, and as many of its draft's as the model agreed with."""
        self.stats.decode_steps += 1
        starts = forward.decode_offsets()
        for k, i in enumerate(forward.decode):
            s = self.active[i]
            s.tokens.append(s.generated[-1])
            if i in picks:
                self._accept(s, picks[i], finished)
                continue
            draft = forward.drafts[i]
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
