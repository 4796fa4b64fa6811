"""The constitution as typed objects: its principles, worked examples and run defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Principle:
    id: str
    critique: str
    revision: str
    choice: str | None = None
    tags: tuple[str, ...] = ()
    weight: float = 1.0

    def as_template_vars(self) -> dict[str, Any]:
        return {"id": self.id, "critique": self.critique, "revision": self.revision,
                "choice": self.choice, "tags": list(self.tags), "weight": self.weight}


@dataclass(frozen=True)
class FewShot:
    """A worked example, shown to the model as earlier turns of the same conversation."""

    prompt: str
    response: str
    critique: str
    revision: str
    principle: str | None = None


@dataclass(frozen=True)
class FeedbackExample:
    """A worked comparison, shown to the feedback model as an earlier exchange (issue 33)."""

    prompt: str
    a: str
    b: str
    answer: str                      # "A" or "B"
    principle: str | None = None     # whose `choice` question is asked
    question: str | None = None
    reasoning: str | None = None     # shown before the answer with --cot


@dataclass(frozen=True)
class Defaults:
    revisions: int = 1
    sampling: str = "random"


@dataclass(frozen=True)
class Constitution:
    name: str
    principles: tuple[Principle, ...]
    path: str
    sha256: str
    version: int = 1
    description: str = ""
    defaults: Defaults = Defaults()
    few_shot: tuple[FewShot, ...] = ()
    feedback_examples: tuple[FeedbackExample, ...] = ()

    @property
    def ref(self) -> str:
        """`name@hash-prefix`: names this exact file content in every record."""
        return f"{self.name}@{self.sha256[:12]}"

    def principle(self, principle_id: str) -> Principle:
        for p in self.principles:
            if p.id == principle_id:
                return p
        raise KeyError(principle_id)

    def few_shot_principle(self, example: FewShot) -> Principle:
        return self.principle(example.principle) if example.principle else self.principles[0]
