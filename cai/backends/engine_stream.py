"""The Stream of the local engine (cai.backends.engine) for the HF backend: turns are tokenized
here, decoded by the engine, and, with `on_text`, detokenized as they grow."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cai.backends.base import Completion, Request, SamplingParams, TextCallback
from cai.errors import UsageError

if TYPE_CHECKING:
    from cai.backends.hf import HFBackend


class EngineStream:
    """A conversation's next turn reuses the cache its previous turn left. With `on_text`, each
    engine step decodes the ids every running turn has so far, whole (so a character split over
    several byte-level tokens comes out whole once its last byte is there; text that ends in an
    unfinished character waits for the rest), and calls `on_text` where the text changed."""

    def __init__(self, backend: HFBackend, engine, params: SamplingParams, on_text: TextCallback | None = None):
        self.backend, self.engine, self.params, self.on_text = backend, engine, params, on_text
        self._shown: dict[str, tuple[int, str]] = {}     # key → (ids decoded, text shown)

    def submit(self, request: Request) -> None:
        tokens = self.backend.encode(request.conversation)
        try:
            params = request.params or self.params
            self.engine.submit(request.key, tokens, params.max_new_tokens,
                               temperature=0.0 if params.greedy else params.temperature,
                               top_p=params.top_p, seed=request.seed)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        self._shown.pop(request.key, None)

    def poll(self) -> list[tuple[str, Completion]]:
        while self.engine.busy:
            finished = self.engine.step()
            if self.on_text:
                self._show_partial()
            if finished:
                done = [(key, self.backend.decode(r.tokens, r.finish_reason, r.prompt_tokens)) for key, r in finished]
                if self.on_text:
                    for key, completion in done:
                        self._shown.pop(key, None)
                        self.on_text(key, completion.text)
                return done
        return []

    def _show_partial(self) -> None:
        decode = self.backend.tokenizer.decode
        for key, ids in self.engine.partial():
            count, shown = self._shown.get(key, (0, ""))
            if len(ids) == count:
                continue
            text = decode(ids, skip_special_tokens=True)
            # a last character whose bytes are not all there yet waits for the rest
            text = text.rstrip("\ufffd").strip()
            self._shown[key] = (len(ids), text)
            if text != shown:
                self.on_text(key, text)

    def release(self, key: str) -> None:
        self._shown.pop(key, None)
        self.engine.release(key)
