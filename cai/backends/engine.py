"""A continuous-batching decode engine over a transformers causal LM. It joins four parts, each
in its own file, as nano-vllm and vLLM split theirs:

  * the scheduler (scheduler.py), over plain data: admission, prefix reuse, cache sizing, which
    rows run in which forward, prompt-lookup drafts (drafting.py), what each forward's ids did;
  * the runner (runner.py), with fused.py the only files that touch the model's internals: the
    forward over the cache, with cascade attention (attention.py), and the output head (on cai's
    bfloat16 kernels, a Llama-layout model's forward runs fused: five native calls a layer);
  * the sampler (sampler.py): each row's next id from its logits;
  * the cache's storage (kv_cache.py), apart from what one forward needs of it (step_metadata.py).

What makes it fast on a CPU (and sound on a GPU):
  * a static per-slot KV cache, written in place: no step ever copies the cache;
  * continuous batching: a conversation whose turn ends leaves the decode batch at once and the
    next request takes its place, so batches stay full rather than waiting for the longest;
  * prefix reuse: a request is matched token by token against what its slot already holds (the
    previous turn of the same conversation) or, for a new conversation, against the first
    conversation seen (the shared system prompt and few-shot turns); only the part that differs
    is encoded, and the shared part is stored once, never copied into the slots;
  * packed forwards: the rows' new ids run as one sequence, so no padding goes through the
    linear layers; a step's decode rows and the turns waiting to be encoded share one forward;
  * cascade attention over the shared root prefix and each row's own positions, every id by
    the native kernel (kernels.py) where there is one, so an id's logits are the same bits
    whatever shares its forward; else by PyTorch's kernels (the root one product for all rows);
  * prompt-lookup drafts for greedy turns, checked in the same forward.

The engine speaks token ids only: the HF backend owns the tokenizer and the chat template."""

from __future__ import annotations

import torch

from cai.backends.kv_cache import SlotCache
from cai.backends.runner import ModelRunner
from cai.backends.sampler import Sampler
from cai.backends.scheduler import Allocate, Forward, Grow, Move, Scheduler
from cai.backends.slots import EngineResult, EngineStats

__all__ = ["Engine", "EngineResult", "EngineStats"]


class Engine:
    """Requests in, finished turns out. `submit` a conversation's token ids under a key (the same
    key again for its next turn, so the cache carries over), call `step` until results come back,
    and `release` the key when the conversation is over."""

    def __init__(self, model, slots: int, stop_ids: list[int], context_length: int | None = None,
                 draft: bool = True, capacity: int | None = None, kv_dtype: torch.dtype | None = None,
                 sampler: Sampler | None = None):
        """`capacity`: positions a slot needs for the longest conversation expected, where known
        (the cache is then allocated once). `kv_dtype`: the dtype keys and values are kept in,
        where not the model's. `sampler`: how each row's next id is picked (a `Sampler`)."""
        self.stats = EngineStats()
        self.runner = ModelRunner(model, kv_dtype, self.stats)
        self.scheduler = Scheduler(slots, stop_ids, context_length, draft, capacity, self.stats)
        self.sampler = sampler or Sampler()
        self.cache: SlotCache | None = None
        self._root_cache: SlotCache | None = None      # where the first conversation's prompt was encoded

    # -- requests ---------------------------------------------------------------------------

    @torch.inference_mode()
    def submit(self, key: str, tokens: list[int], max_new_tokens: int, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None) -> None:
        self.scheduler.submit(key, tokens, max_new_tokens, temperature, top_p, seed)
        self._apply()

    @torch.inference_mode()
    def release(self, key: str) -> None:
        """Frees the slot of a finished conversation."""
        self.scheduler.release(key)
        self._apply()

    def partial(self) -> list[tuple[str, list[int]]]:
        """(key, ids generated so far) of each turn still being decoded (ids, not text: the
        engine knows no tokenizer). The lists are the engine's own: read, do not change."""
        return self.scheduler.partial()

    @property
    def busy(self) -> bool:
        return self.scheduler.busy

    def _apply(self) -> None:
        """Does to the storage what the scheduler decided."""
        for op in self.scheduler.take_ops():
            if isinstance(op, Allocate):
                self.cache = self.runner.new_cache(self.scheduler.slots, op.capacity)
                if self._root_cache is not None:
                    self.cache.take_root(self._root_cache, len(self.scheduler.root_tokens))
            elif isinstance(op, Grow):
                self.cache.grow(op.capacity, op.lengths)
            elif isinstance(op, Move) and self.cache is not None:
                self.cache.copy(op.source, op.target, op.length)

    # -- the loop -----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[tuple[str, EngineResult]]:
        """Admits waiting requests, encodes what new requests need, and decodes one token for
        every conversation in flight. Returns the turns that ended."""
        scheduler = self.scheduler
        scheduler.admit()
        self._apply()
        finished: list[tuple[str, EngineResult]] = []
        root = scheduler.root_row()
        if root is not None:
            # The first conversation goes alone, into a cache of its own, and its prompt becomes
            # the root the others start from.
            s = scheduler.active[root]
            self._root_cache = self.runner.new_cache(1, len(s.tokens) + len(s.pending))
            finished += self._run(scheduler.prepare([], [root]), self._root_cache)
            scheduler.root_encoded(root)
            if self.cache is not None:
                self.cache.take_root(self._root_cache, len(scheduler.root_tokens))
        for forward in scheduler.forwards(root):
            self._apply()
            finished += self._run(forward, self.cache)
        return finished

    def _run(self, forward: Forward, cache: SlotCache) -> list[tuple[str, EngineResult]]:
        """One forward, its ids picked, and what they did to the rows."""
        scheduler = self.scheduler
        slots = forward.rows if cache is self.cache else list(range(len(forward.rows)))
        logits = self.runner.forward(cache, slots, forward.ids, forward.starts, forward.bases,
                                     every=len(forward.decode))
        decoded = forward.decoded
        picks, greedy = {}, None
        if forward.decode:
            decode = logits[:decoded]
            starts = forward.decode_offsets()
            plain = [k for k, i in enumerate(forward.decode) if i not in forward.drafts]
            first = decode if len(plain) == len(forward.decode) else decode[[starts[k] for k in plain]]
            greedy = decode.argmax(dim=-1).tolist() if forward.drafts else None      # (one pass over the logits)
            known = None if greedy is None else [greedy[starts[k]] for k in plain]
            rows = [forward.decode[k] for k in plain]
            picks = dict(zip(rows, self.sampler.pick(first, [scheduler.active[i].request for i in rows], known)))
        encoded = (self.sampler.pick(logits[decoded:], [scheduler.active[i].request for i in forward.prefill])
                   if forward.prefill else [])
        return scheduler.complete(forward, picks, greedy, encoded)
