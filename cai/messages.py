"""The shapes every layer passes around: chat messages, prompt items and their ids, and the text
of a record's field (a string or a list of chat messages). Imports nothing of cai."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

Message = dict[str, str]


@dataclass(frozen=True)
class PromptItem:
    id: str
    text: str
    line: int                  # 1-based line (or table row) in the source, for messages
    truncated: bool = False    # cut to fit the model's context (--truncate-long)
    index: int | None = None   # 0-based place among the prompts of the whole input (before any
                               # limit, shard or skipped line): what round-robin sampling counts by


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
