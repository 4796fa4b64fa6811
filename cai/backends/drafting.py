"""Prompt-lookup drafting (greedy turns only): a row whose last two ids occurred earlier in its
conversation proposes the ids that followed them there, up to DRAFT_MAX; one forward checks them
all, and every id the model agrees with saves the row a decode step (the small model repeats
itself and its revisions copy its answers). Ids are packed, so a draft costs only its own
columns; it is worth them where a step's fixed cost (reading the weights and the attention's
keys, per-op overhead: DRAFT_STEP_COST ids' worth of compute) is shared among few rows. See
`draft_length`. That cost is a property of the machine: ~60 ms against ~5 ms an id (12) on a
2-core AVX2 CPU, ~45 ms against ~1.2 ms (~37) on a 2-core AVX-512/AMX one, where 12 left the
64-prompt bench (bench/peers.py's settings) 6-10% slower than 24 to 40. It is a constant, not
timed at run time. A row's logits do not depend on what shares its forward (the linears' kernels
and the native attention sum each row in one order, tests/test_engine.py), so drafts never change
records; where they would (int8, or PyTorch's attention without the native kernel), a draft
length chosen from timings would make two identical runs differ.

The engine (engine.py) calls `propose` for each greedy decode row before a step and checks the
drafts against the model's own choices after it."""

from __future__ import annotations

from cai.backends.slots import Slot

DRAFT_MAX = 8
DRAFT_STEP_COST = 24


def propose(s: Slot, worth: float, most: int, capacity: int) -> list[int]:
    """The draft of one decode row (empty for none): at most `most` ids, `worth` as in
    `draft_length`, never past the cache's `capacity` (drafts do not grow it)."""
    if s.request.temperature > 0 or len(s.tokens) < 2:
        return []
    # index every pair of ids whose continuation is known: (tokens[j-1], tokens[j]) → j
    tokens = s.tokens
    for j in range(max(s.indexed, 1), len(tokens) - 1):
        s.lookup[(tokens[j - 1], tokens[j])] = j
    s.indexed = max(s.indexed, len(tokens) - 1)
    end = s.lookup.get((tokens[-1], s.generated[-1]))
    if end is None:
        return []
    # agreement per draft id, from the turn's own record (a revision that copies its answer
    # agrees far more often than a first answer does) and a prior of 90%
    rate = (s.agreed + 3.6) / (s.agreed + s.disagreed + 4)
    longest = draft_length(rate, worth, most)
    # what followed that pair then (up to the row's last id, not yet in `tokens`)
    draft = tokens[end + 1:end + 1 + longest]
    if len(draft) < longest:
        draft.append(s.generated[-1])
    # one forward yields the draft plus one id: no more than the turn has left, and never
    # past the cache's room (drafts do not grow it)
    return draft[:min(longest, s.request.max_new_tokens - len(s.generated) - 1, capacity - len(tokens) - 2)]


def draft_length(rate: float, worth: float, most: int = DRAFT_MAX) -> int:
    """How many draft ids a row may bring. A draft's j-th id counts only if the model agreed
    with all before it: at `rate` of agreement per id, that is rate**j. An id that counts saves
    its row a later step, worth DRAFT_STEP_COST / rows ids of compute; one that does not costs
    its own; so the j-th id is worth bringing while rate**j * `worth` >= 1, `worth` being
    1 + DRAFT_STEP_COST / rows: long drafts when few rows share a step, short in a full batch."""
    length = 0
    while length < most and rate ** (length + 1) * worth >= 1:
        length += 1
    return length
