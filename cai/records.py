"""Record shapes that preference and SFT trainers read unmodified (TRL's dataset formats).

standard        prompt / chosen / rejected as strings (what `cai generate` writes by default)
conversational  prompt as a list of messages (system turn included), chosen / rejected as
                one-assistant-message lists; the trainer applies the chat template itself
sft             prompt / completion strings: the prompt and its final revision (SL-CAI)
A prompt that is a conversation with earlier turns (chat transcripts) has only the
conversational shape: its `prompt` list holds the whole history. (The pipeline's own records keep
those turns in `history` until they are written.)
Every shape keeps `id`, `principle`, `critique`, `rounds` and `meta`.

`Record` is the shape of the pipeline's own records (cai.pipeline makes them; the filters, the
judge, the writers and the readers take them); the trainer shapes are made from it by to_format.
"""

from __future__ import annotations

import re
from typing import Any, TypedDict

from cai.messages import Message
from cai.messages import text_of as _text


# what a backend appends to `meta.model` to say how the model ran: cai's CPU precisions
# (cai.backends.hf.weights_name) and vLLM's engine and precision (cai.backends.vllm)
_HOW_IT_RAN = re.compile(r" \((?:int8|bfloat16|vllm(?:, [^()]*)?)\)$")


def base_model(name: str) -> str:
    """The model a record's `meta.model` names, without what says how it ran ("m (bfloat16)",
    "m (int8)", "m (vllm, bfloat16)" → "m"): what a trainer loads."""
    return _HOW_IT_RAN.sub("", name)


class Round(TypedDict, total=False):
    """One critique/revise round."""

    principle: str              # the principle's id
    critique: str
    revision: str
    reasoning: dict[str, str | None]    # reasoning "keep": {"critique": …, "revision": …}


class _Required(TypedDict):
    id: str
    prompt: str                 # the last user turn (the conversational shape: the messages)
    chosen: str                 # the last revision
    rejected: str               # the first response
    principle: str              # the last round's principle, critique
    critique: str
    rounds: list[Round]
    meta: dict[str, Any]        # the run's fingerprint (model, constitution, templates, params, …),
                                # finish_reasons, tokens, created, cai; where they apply: system,
                                # prompt_truncated, given_response, attempts, repairs, reasoning,
                                # and what later steps add (cleaned, judge, edit, review)


class Record(_Required, total=False):
    """A record as the pipeline makes it (the standard shape, with `history`)."""

    history: list[Message]      # a conversation's earlier turns (system turn included)
    reasoning: str | None       # the response's reasoning (reasoning "keep")

FORMATS = ("standard", "conversational")
EXPORT_FORMATS = ("standard", "conversational", "sft")


def _system(record: Record) -> str | None:
    prompt = record.get("prompt")
    if isinstance(prompt, list):
        return next((m["content"] for m in prompt if m.get("role") == "system"), None)
    return (record.get("meta") or {}).get("system")


def conversation_of(record: Record) -> tuple[str | None, list[dict], str]:
    """(system message, earlier turns, the last user turn) of a record in either shape: the
    standard shape keeps a conversation's earlier turns in `history`, the conversational one in
    its `prompt` list."""
    prompt = record["prompt"]
    if isinstance(prompt, list):
        turns = [m for m in prompt if m.get("role") != "system"]
        return _system(record), turns[:-1], _text(prompt)
    history = [m for m in record.get("history") or () if m.get("role") != "system"]
    return _system(record), history, prompt


def to_format(record: Record, fmt: str) -> dict:
    """The same record in another shape. Converting back and forth loses nothing; a conversation
    with earlier turns has no string shape (standard, sft) and raises ValueError."""
    extra = {k: v for k, v in record.items() if k not in ("prompt", "chosen", "rejected", "completion", "history")}
    system, history, prompt = conversation_of(record)
    chosen = _text(record["chosen"] if "chosen" in record else record["completion"])
    if history and fmt in ("standard", "sft"):
        raise ValueError(f"record {record.get('id')}: a conversation with {len(history)} earlier turns cannot "
                         f"be a {fmt} record (its prompt is one string); use the conversational format")
    if fmt == "standard":
        return {"id": record.get("id"), "prompt": prompt, "chosen": chosen,
                "rejected": _text(record["rejected"]), **extra}
    if fmt == "conversational":
        messages = [*([{"role": "system", "content": system}] if system else []), *history,
                    {"role": "user", "content": prompt}]
        return {"id": record.get("id"), "prompt": messages,
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": _text(record["rejected"])}], **extra}
    if fmt == "sft":
        return {"id": record.get("id"), "prompt": prompt, "completion": chosen, **extra}
    raise ValueError(f"unknown format {fmt!r}")


def _unit(key: str) -> float:
    """A number in [0, 1) that depends only on `key`."""
    import hashlib

    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def split_by_id(records: list[Record], test_size: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, test): a record's side depends only on its id and the seed."""
    train, test = [], []
    for record in records:
        (test if _unit(f"{seed}\x1f{record.get('id')}") < test_size else train).append(record)
    return train, test


def shard_of(record_id: str, shards: int) -> int:
    """The shard (1…shards) a prompt id belongs to: the same on every machine and every run."""
    return int(_unit(f"shard\x1f{record_id}") * shards) + 1
