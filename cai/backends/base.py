"""The backend protocol. Backends know chat messages and sampling settings, nothing of
constitutions: the pipeline hands them conversations and gets text back."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str        # "stop" (end of turn) or "length" (hit max_new_tokens)
    prompt_tokens: int
    completion_tokens: int


class Backend(Protocol):
    model_name: str                 # what records name as meta.model
    context_length: int | None      # tokens a conversation plus its completion may hold (None: unknown)

    def count_tokens(self, conversation: list[dict[str, str]]) -> int:
        """Tokens of the conversation as the model sees it, generation prompt included."""
        ...

    def generate(self, conversations: list[list[dict[str, str]]], params: SamplingParams,
                 seed: int | None = None) -> list[Completion]:
        """One completion per conversation, in order. `seed` makes sampling reproducible."""
        ...

    def close(self) -> None: ...
