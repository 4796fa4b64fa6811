"""The engine's sampler: each row's next id from its logits, the argmax for a greedy turn, else a
sample (temperature, then top-p) drawn from the turn's own seeded generator, so what a turn
samples does not depend on what else shares its step.

The engine takes a `Sampler` (`Engine(..., sampler=...)`); a check that needs an engine picking
other ids passes a subclass rather than patching the engine."""

from __future__ import annotations

import torch

from cai.backends.slots import EngineRequest


class Sampler:
    def pick(self, logits: torch.Tensor, requests: list[EngineRequest],
             greedy: list[int] | None = None) -> list[int]:
        """Row r's next id for requests[r]: the argmax (`greedy`, where the caller already has
        it) or a sample."""
        picks = logits.argmax(dim=-1).tolist() if greedy is None else greedy
        for row, r in enumerate(requests):
            if r.temperature <= 0:
                continue
            probs = torch.softmax(logits[row] / r.temperature, dim=-1)
            if r.top_p < 1.0:
                sorted_probs, order = torch.sort(probs, descending=True)
                drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > r.top_p
                sorted_probs[drop] = 0
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            picks[row] = int(torch.multinomial(probs, 1, generator=self.generator(r, logits.device)))
        return picks

    @staticmethod
    def generator(request: EngineRequest, device: torch.device) -> torch.Generator:
        """The turn's generator, on the logits' device, seeded on its first sample with the
        request's seed (a random one where it has none)."""
        if request.sampling is None:
            request.sampling = torch.Generator(device=device)
            request.sampling.manual_seed(request.seed if request.seed is not None else torch.seed())
        return request.sampling
