"""The backend protocol. Backends know chat messages and sampling settings, nothing of
constitutions: the pipeline hands them conversations and gets text back."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Callable, Protocol, runtime_checkable

from cai.messages import Message


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
    error: str | None = None  # set (with finish_reason "error") when a remote request failed for good
    # What the server returned as reasoning apart from `text` (reasoning_content / reasoning);
    # None when it returned none. `text` is as generated: inline <think> blocks stay in it.
    reasoning: str | None = None


@dataclass(frozen=True)
class ChoiceScores:
    """How likely each of a few single-token answers ("A", "B") is as the next token."""

    logprobs: dict[str, float]      # choice → log-probability (-inf: the backend saw no such token)
    error: str | None = None        # set when the backend could not score this conversation


@dataclass(frozen=True)
class Request:
    key: str                        # names a conversation; its next turn is submitted under the same key
    conversation: list[Message]
    seed: int | None = None
    params: SamplingParams | None = None    # this turn's own sampling settings (None: the stream's)


# (key, text so far) while a turn is generated: see Stream
TextCallback = Callable[[str, str], None]


class Stream(Protocol):
    """Many conversations in flight at once. `submit` a turn, `poll` for turns that ended (it
    returns as soon as at least one has; an empty list only when nothing is in flight), submit
    the conversation's next turn under the same key, and `release` the key when it is over.

    A stream opened with `on_text` (see `Backend.stream`) also shows each turn as it is
    generated: `on_text(key, text)` is called from within `poll`, on the caller's thread, with
    the whole text of the turn so far (stripped, as the Completion's is), as often as the backend
    learns more of it. The text normally grows by a suffix each call, but may be rewritten (a
    decoder that joins a piece to the one before it; a remote request retried from the start).
    A turn's last call, made before `poll` returns the turn, carries exactly its Completion's
    `text`; a turn that failed gets no last call. Reasoning a server returns apart from the
    text is not shown. Without `on_text` nothing of this runs and nothing else changes: the
    completions are the same either way."""

    def submit(self, request: Request) -> None: ...

    def poll(self) -> list[tuple[str, Completion]]: ...

    def release(self, key: str) -> None: ...


class Backend(Protocol):
    """What every backend does. What only some do is a capability below (Scoring,
    ThinkingSwitch), checked with isinstance: a backend written before one need not have it."""

    model_name: str                 # what records name as meta.model
    context_length: int | None      # tokens a conversation plus its completion may hold (None: unknown)

    def count_tokens(self, conversation: list[dict[str, str]]) -> int:
        """Tokens of the conversation as the model sees it, generation prompt included."""
        ...

    def generate(self, conversations: list[list[dict[str, str]]], params: SamplingParams,
                 seed: int | None = None) -> list[Completion]:
        """One completion per conversation, in order. `seed` makes sampling reproducible."""
        ...

    def default_width(self) -> int:
        """Conversations in flight when the user names no width (no --batch-size): what the
        backend handles best (a local model: what its KV cache fits; a server: its concurrency).
        The run decides the width in one place: the batch size if given, else this."""
        ...

    def stream(self, params: SamplingParams, width: int, longest: int | None = None,
               on_text: TextCallback | None = None) -> Stream:
        """Up to `width` conversations in flight (backends without one of their own return
        `LockstepStream(self, params, width, on_text)`). `longest`: the most tokens any
        conversation of the run can hold, where known (a local engine sizes its cache once from
        it). `on_text`: show turns as they are generated (see Stream); callers that do not need
        it leave it out, so backends written before it need not take it."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class Scoring(Protocol):
    """A backend that reads answers' log-probabilities: the judge and feedback models need it."""

    def score_choices(self, conversations: list[list[dict[str, str]]], choices: tuple[str, ...],
                      prefix: str = "") -> list[ChoiceScores]:
        """For each conversation, the log-probability of each choice as the next token of the
        assistant's reply, which starts with `prefix` (e.g. "The answer is: ("). One result per
        conversation, in order; one that could not be scored has `error` set."""
        ...


@runtime_checkable
class ThinkingSwitch(Protocol):
    """A backend that can tell a reasoning model not to think."""

    # True when the model's chat template takes `enable_thinking`, False when it does not, None
    # when the backend cannot see the template (a server)
    thinking_switch: bool | None

    def set_thinking(self, enabled: bool | None) -> None:
        """Render every later conversation with `enable_thinking=enabled` where the chat template
        takes it (a server: ask for it in each request). None, the default, leaves the
        template's own default alone."""
        ...


class LockstepStream:
    """A Stream over `Backend.generate`: each poll runs the waiting turns (up to `width`) as one
    batch. For backends with no scheduling of their own. `on_text` gets each turn's text only
    once, whole, when its batch is done: `generate` shows nothing before."""

    def __init__(self, backend: Backend, params: SamplingParams, width: int,
                 on_text: TextCallback | None = None):
        self.backend, self.params, self.width, self.on_text = backend, params, width, on_text
        self._waiting: list[Request] = []

    def submit(self, request: Request) -> None:
        self._waiting.append(request)

    def poll(self) -> list[tuple[str, Completion]]:
        if not self._waiting:
            return []
        # one batch shares its sampling settings: the first waiting turn's, and those like it
        params = self._waiting[0].params or self.params
        alike = [r for r in self._waiting if (r.params or self.params) == params]
        batch = alike[:self.width]
        taken = {id(r) for r in batch}
        self._waiting = [r for r in self._waiting if id(r) not in taken]
        seeds = [str(r.seed) for r in batch if r.seed is not None]
        seed = int.from_bytes(hashlib.sha256(",".join(seeds).encode()).digest()[:4], "little") if seeds else None
        completions = self.backend.generate([r.conversation for r in batch], params, seed=seed)
        if self.on_text:
            for r, c in zip(batch, completions):
                if c.error is None:
                    self.on_text(r.key, c.text)
        return [(r.key, c) for r, c in zip(batch, completions, strict=True)]

    def release(self, key: str) -> None:
        self._waiting = [r for r in self._waiting if r.key != key]


def run_through_stream(stream: Stream, conversations: list[list[dict[str, str]]],
                       seed: int | None = None) -> list[Completion]:
    """`Backend.generate` for a backend whose `stream` schedules itself: every conversation
    submitted (conversation i sampled with seed + i), polled until each has its completion, in
    the conversations' order."""
    for i, conversation in enumerate(conversations):
        stream.submit(Request(key=str(i), conversation=conversation, seed=None if seed is None else seed + i))
    results: dict[str, Completion] = {}
    while len(results) < len(conversations):
        finished = stream.poll()
        if not finished:
            break
        results.update(finished)
    return [results[str(i)] for i in range(len(conversations))]


def single_tokens(encode: Callable[[str], list[int]], choice: str, model_name: str) -> list[int]:
    """The single tokens that spell `choice` ("A"), bare and after a space, by a tokenizer's
    `encode` (text to ids, no special tokens); a UsageError if it has none."""
    from cai.errors import UsageError

    found = []
    for text in (choice, " " + choice):
        ids = encode(text)
        if len(ids) == 1 and ids[0] not in found:
            found.append(ids[0])
    if not found:
        raise UsageError(f"{model_name}: the tokenizer has no single token for the choice '{choice}'")
    return found
