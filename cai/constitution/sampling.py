"""Which principles each record of a prompt is made with (--sampling)."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cai.constitution.model import Constitution, Principle

SAMPLING_MODES = ("random", "all", "cycle")
MAX_REVISIONS = 100     # each round is two more turns of one conversation; the paper used up to 4


def plan_principles(constitution: Constitution, prompt_id: str, index: int, rounds: int,
                    mode: str, seed: int) -> list[list[Principle]]:
    """The principles for each record made from one prompt: one list of `rounds` principles per
    record. `random` and `cycle` make one record per prompt, `all` one per principle. Choices
    depend only on (seed, prompt id, position), so a resumed or re-batched run picks the same."""
    principles = list(constitution.principles)
    if mode == "cycle":
        n = len(principles)
        return [[principles[(index * rounds + r) % n] for r in range(rounds)]]
    rng = random.Random(f"{seed}\x1f{prompt_id}")
    if mode == "random":
        return [_draw(rng, principles, rounds, first=None)]
    if mode == "all":
        return [_draw(rng, principles, rounds, first=p) for p in principles]
    raise ValueError(f"unknown sampling mode {mode!r}")


def _draw(rng: random.Random, principles: list[Principle], rounds: int,
          first: Principle | None) -> list[Principle]:
    """Weighted draws without repeats until every principle has been used once."""
    chosen: list[Principle] = [first] if first else []
    pool = [p for p in principles if p is not first]
    while len(chosen) < rounds:
        if not pool:
            pool = [p for p in principles if p is not chosen[-1]] or list(principles)
        pick = rng.choices(pool, weights=[p.weight for p in pool])[0]
        pool.remove(pick)
        chosen.append(pick)
    return chosen
