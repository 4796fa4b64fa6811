"""A scripted backend: no model, deterministic text from the conversation, failures and context
limits on request. It lets a run's logic (resume, side files, curation, outcome, export) be
tested in milliseconds, through the same Backend protocol a real model uses: cai's own tests use
it, and so can yours (`cai generate prompts.jsonl --backend scripted`, or
`cai.generate(prompts, model=ScriptedBackend(fail={"boom"}))` from Python)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cai.backends.base import ChoiceScores, Completion, Request


@dataclass
class ScriptedSettings:
    """The scripted backend has no options of its own."""


class ScriptedBackend:
    about = "no model: deterministic scripted text, to try a constitution, templates or a pipeline in milliseconds"
    Settings = ScriptedSettings

    @classmethod
    def check_settings(cls, spec) -> None:
        pass

    @classmethod
    def resolve(cls, spec) -> tuple[None, str]:
        return None, spec.model or "scripted"

    @classmethod
    def from_spec(cls, spec, source, model_name: str) -> "ScriptedBackend":
        return cls(model_name=model_name)

    def __init__(self, *, fail: set[str] = frozenset(), unchanged: set[str] = frozenset(),
                 context_length: int | None = None, model_name: str = "scripted", width: int = 4):
        self.model_name = model_name
        self.context_length = context_length
        self.fail = set(fail)              # prompts whose every turn fails
        self.unchanged = set(unchanged)    # prompts whose revision repeats the response (a filter drops it)
        self.width = width
        self.calls = 0
        self.closed = False
        self.thinking_switch: bool | None = False     # no chat template to switch
        self.thinking: bool | None = None

    def set_thinking(self, enabled: bool | None) -> None:
        self.thinking = enabled

    def count_tokens(self, conversation) -> int:
        return sum(len(m["content"].split()) + 4 for m in conversation) + 2

    def default_width(self) -> int:
        return self.width

    def reply(self, conversation, turn: int) -> Completion:
        """Turn 0 is the response, odd turns critiques, even ones revisions."""
        self.calls += 1
        text = " ".join(m["content"] for m in conversation)
        hit = [p for p in self.fail if p in text]
        if hit:
            return Completion("", "error", 0, 0, error=f"scripted failure for {hit[0]!r}")
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        if turn == 0:
            reply = f"Sure. Step one, boil water {digest}. Step two, wait. Step three, pour it slowly."
        elif turn % 2:
            reply = f"The reply {digest} skips safety notes and could warn about burns."
        elif any(p in text for p in self.unchanged):
            reply = conversation[-(2 * turn)]["content"]          # the response, repeated
        else:
            reply = f"Heat the kettle carefully ({digest}); keep children away; pour gently to avoid burns, then rest."
        return Completion(reply, "stop", self.count_tokens(conversation), len(reply.split()))

    def generate(self, conversations, params, seed=None):
        return [self.reply(conversation, 0) for conversation in conversations]

    def stream(self, params, width, longest=None):
        return ScriptedStream(self, width)

    def score_choices(self, conversations, choices, prefix=""):
        return [ChoiceScores({"A": -1.0, "B": -0.5}) for _ in conversations]

    def close(self) -> None:
        self.closed = True


class ScriptedStream:
    """Each poll answers up to `width` waiting turns. A conversation's turn number is kept by its
    key, as a real engine keeps a conversation's state: each turn adds two messages (the reply and
    the next request), so a request as long as the last one is that turn again (a repair), and
    one two messages shorter the turn before it (a repair from the critique)."""

    def __init__(self, backend: ScriptedBackend, width: int):
        self.backend, self.width = backend, width
        self.waiting: list[tuple[Request, int]] = []
        self.turns: dict[str, tuple[int, int]] = {}      # key → (turn, messages) of its last request

    def submit(self, request: Request) -> None:
        turn, length = self.turns.get(request.key, (None, 0))
        turn = 0 if turn is None else turn + (len(request.conversation) - length) // 2
        self.turns[request.key] = (turn, len(request.conversation))
        self.waiting.append((request, turn))

    def poll(self):
        batch, self.waiting = self.waiting[:self.width], self.waiting[self.width:]
        return [(request.key, self.backend.reply(request.conversation, turn)) for request, turn in batch]

    def release(self, key: str) -> None:
        self.turns.pop(key, None)
