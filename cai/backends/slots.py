"""What the engine keeps for each conversation in flight (its turn's request and the slot of the
KV cache it owns) and what it reports (each finished turn, and counters over the run). Plain
data: the scheduler (scheduler.py) works on these with no model and no torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
    # the arithmetic done (what a bench turns into FLOPs): ids run through the model, rows of the
    # output head, and the positions all those ids attended to
    ids: int = 0
    head_rows: int = 0
    attended: int = 0


@dataclass
class EngineRequest:
    """One turn the engine is asked to decode (a backend's `Request` is a conversation; this is
    its token ids and sampling settings, as the engine takes them)."""
    key: str
    tokens: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    # the sampler's state for this turn (its generator), made on its first sample
    sampling: Any = field(default=None, compare=False, repr=False)


@dataclass
class Slot:
    key: str
    tokens: list[int] = field(default_factory=list)      # ids whose K/V are in this slot, in order
    pending: list[int] = field(default_factory=list)     # ids still to encode before decoding
    generated: list[int] = field(default_factory=list)
    request: EngineRequest | None = None
    state: str = "idle"                                  # prefill → decode → done
    fresh: bool = False                                  # a new conversation, not yet matched to the root
    root_shared: int = 0                                 # leading positions read from the root, not stored here
    reused: int = 0
    lookup: dict = field(default_factory=dict)           # (id, id) → where that pair last ended in tokens
    indexed: int = 0                                     # tokens[:indexed] are in `lookup`
    agreed: int = 0                                      # this turn's draft ids the model agreed with
    disagreed: int = 0                                   # and drafts it cut short

    @property
    def stored(self) -> int:
        """Positions this slot holds in the cache (its tokens past the root's share)."""
        return len(self.tokens) - self.root_shared
