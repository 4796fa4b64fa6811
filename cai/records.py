"""Record shapes that preference and SFT trainers read unmodified (TRL's dataset formats).

standard        prompt / chosen / rejected as strings (what `cai generate` writes by default)
conversational  prompt as a list of messages (system turn included), chosen / rejected as
                one-assistant-message lists; the trainer applies the chat template itself
sft             prompt / completion strings: the prompt and its final revision (SL-CAI)
Every shape keeps `id`, `principle`, `critique`, `rounds` and `meta`.
"""

from __future__ import annotations

from cai.messages import text_of as _text

FORMATS = ("standard", "conversational")
EXPORT_FORMATS = ("standard", "conversational", "sft")


def _system(record: dict) -> str | None:
    prompt = record.get("prompt")
    if isinstance(prompt, list):
        return next((m["content"] for m in prompt if m.get("role") == "system"), None)
    return (record.get("meta") or {}).get("system")


def to_format(record: dict, fmt: str) -> dict:
    """The same record in another shape. Converting back and forth loses nothing."""
    extra = {k: v for k, v in record.items() if k not in ("prompt", "chosen", "rejected", "completion")}
    prompt, system = _text(record["prompt"]), _system(record)
    chosen = _text(record["chosen"] if "chosen" in record else record["completion"])
    if fmt == "standard":
        return {"id": record.get("id"), "prompt": prompt, "chosen": chosen,
                "rejected": _text(record["rejected"]), **extra}
    if fmt == "conversational":
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
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


def split_by_id(records: list[dict], test_size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, test): a record's side depends only on its id and the seed."""
    train, test = [], []
    for record in records:
        (test if _unit(f"{seed}\x1f{record.get('id')}") < test_size else train).append(record)
    return train, test


def shard_of(record_id: str, shards: int) -> int:
    """The shard (1…shards) a prompt id belongs to: the same on every machine and every run."""
    return int(_unit(f"shard\x1f{record_id}") * shards) + 1
