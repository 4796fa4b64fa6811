"""The shapes every layer passes around: chat messages, prompt items and their ids, and the text
of a record's field (a string or a list of chat messages). Imports nothing of cai."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

Message = dict[str, str]


@dataclass(frozen=True, slots=True)
class PromptItem:
    id: str
    text: str
    line: int                  # 1-based line (or table row) in the source, for messages
    truncated: bool = False    # cut to fit the model's context (--truncate-long)
    index: int | None = None   # 0-based place among the prompts of the whole input (before any
                               # limit, shard or skipped line): what round-robin sampling counts by
    history: tuple[Message, ...] = ()   # earlier turns of a conversation (a system turn first, if any)
    response: str | None = None         # the answer as given (existing answers): only critique and
                                        # revision run

    @property
    def content_id(self) -> str:
        """The id its content gives it when the input names none."""
        return content_id(self.text, self.history, self.response)


def content_id(text: str, history: tuple[Message, ...] = (), response: str | None = None) -> str:
    """A prompt's id from its content: the hash of the prompt text alone when there is nothing
    else (so plain prompts keep the ids they always had), else of the whole conversation and the
    given response."""
    if not history and response is None:
        return prompt_id(text)
    whole = [*history, {"role": "user", "content": text}]
    if response is not None:
        whole.append({"role": "assistant", "content": response})
    return prompt_id(json.dumps(whole, ensure_ascii=False, sort_keys=True, separators=(",", ":")))


def prompt_id(text: str) -> str:
    """Stable id of a prompt: the first 16 hex digits of the SHA-256 of its text.

    >>> prompt_id("hello")
    '2cf24dba5fb0a30e'
    """
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def text_of(value) -> str:
    """A record field's text whether it is a string or a list of chat messages (the last user or
    assistant message).

    >>> text_of([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}])
    'hi'
    """
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return next((m["content"] for m in reversed(value) if m.get("role") in ("user", "assistant")), "")
    raise ValueError(f"expected a string or a list of messages, got {type(value).__name__}")
