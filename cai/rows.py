"""One input row (a JSONL object, a table row, a Parquet or `datasets` row) made into a prompt:
a plain prompt string, a chat transcript (OpenAI/TRL `messages`, ShareGPT `conversations`,
Anthropic hh-rlhf `\\n\\nHuman: … \\n\\nAssistant: …` text), and a given response where the row
holds one. Every problem is an InputError naming the file, the line (row) and the field.

A conversation that ends with a user turn gets a new answer from the model; one that ends with an
assistant turn has that answer as its response (only critique and revision run) unless
`regenerate` says to drop it. A system turn may only come first."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from cai.errors import InputError
from cai.messages import Message, PromptItem

# The roles of the chat formats people bring, and the role each is to the model.
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant",
         "model": "assistant", "chatgpt": "assistant", "system": "system"}
CONVERSATION_FIELDS = ("messages", "conversations")     # tried, in order, when `prompt` is absent
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


@dataclass(frozen=True)
class Fields:
    """Where a row keeps what cai reads: the prompt (or conversation), a given response, the id."""

    prompt: str = "prompt"
    response: str | None = None
    id: str = "id"
    regenerate: bool = False        # drop a conversation's final assistant turn and answer anew


def item_from_row(name: str, number: int, row: dict, fields: Fields = Fields()) -> PromptItem:
    """The prompt of one row (with `index` still unset)."""
    field = fields.prompt
    found, value = lookup(row, field)
    if not found and field == "prompt":
        field = next((f for f in CONVERSATION_FIELDS if f in row), field)
        found, value = lookup(row, field)
    if not found:
        present = ", ".join(map(str, row)) or "none"
        raise InputError(name, f"missing (fields present: {present}; choose one with `prompt_field`)",
                         line=number, field=fields.prompt)
    rid = row.get(fields.id)
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int)) or not str(rid).strip()):
        raise InputError(name, "expected a non-empty string or integer", line=number, field=fields.id)
    if rid is not None:
        _no_nul(name, number, fields.id, str(rid))
    if isinstance(value, str) and is_transcript(value):
        turns = parse_transcript(name, number, field, value)
    elif isinstance(value, str):
        if not value.strip():
            raise InputError(name, "empty prompt", line=number, field=field)
        _no_nul(name, number, field, value)
        turns = [{"role": "user", "content": value.strip()}]
    elif isinstance(value, (list, tuple)):
        turns = parse_messages(name, number, field, value)
    else:
        raise InputError(name, f"expected a string or a list of chat messages, got {_kind(value)}",
                         line=number, field=field)
    response = None
    if fields.response is not None:
        response = _given_response(name, number, row, fields.response)
        if turns[-1]["role"] == "assistant" and not fields.regenerate:
            raise InputError(name, f"the conversation already ends with an assistant turn and "
                                   f"`response_field` {fields.response} gives another", line=number, field=field)
    history, text, ending = split_turns(name, number, field, turns, fields.regenerate)
    if response is None:
        response = ending
    if fields.regenerate:
        response = None
    item = PromptItem("", text, number, history=tuple(history), response=response)
    return PromptItem(item.content_id if rid is None else str(rid).strip(), text, number,
                      history=item.history, response=response)


def lookup(row: dict, path: str) -> tuple[bool, Any]:
    """(found, value) of a field: a key of the row, or a dotted path into nested objects and
    lists (`conversation.0.content`). A key that itself holds dots wins over the path."""
    if path in row:
        return True, row[path]
    value: Any = row
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, (list, tuple)) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            return False, None
    return True, value


def is_transcript(text: str) -> bool:
    """An hh-rlhf style transcript: it starts with 'Human:' and has an 'Assistant:' turn."""
    return text.lstrip().startswith("Human:") and "\n\nAssistant:" in text


def parse_transcript(name: str, number: int, field: str, text: str) -> list[Message]:
    """The turns of '\\n\\nHuman: … \\n\\nAssistant: …' text; an empty last 'Assistant:' (a
    prompt set made for generation) is the turn to write, so it is left off."""
    text = text.lstrip()
    marks = list(_HH_TURN.finditer(text))
    turns = []
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        content = text[mark.end():end].strip()
        role = "user" if mark.group(1) == "Human" else "assistant"
        if not content:
            if i == len(marks) - 1 and role == "assistant":
                break
            raise InputError(name, f"turn {i + 1} ({mark.group(1)}) of the transcript is empty",
                             line=number, field=field)
        _no_nul(name, number, field, content)
        turns.append({"role": role, "content": content})
    return turns


def parse_messages(name: str, number: int, field: str, value: list | tuple) -> list[Message]:
    """Chat messages in OpenAI/TRL form (`role`, `content`) or ShareGPT form (`from`, `value`);
    `content` may be a list of parts, of which only text parts are taken."""
    if not value:
        raise InputError(name, "an empty conversation", line=number, field=field)
    turns: list[Message] = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise InputError(name, f"expected a chat message object, got {_kind(message)}", line=number, field=where)
        sharegpt = "from" in message and "role" not in message
        role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
        raw_role = message.get(role_key)
        if not isinstance(raw_role, str):
            raise InputError(name, "missing or not a string", line=number, field=f"{where}.{role_key}")
        role = ROLES.get(raw_role.strip().lower())
        if role is None:
            hint = "tool turns are not supported" if raw_role in ("tool", "function", "ipython") else \
                f"expected one of {', '.join(sorted(set(ROLES)))}"
            raise InputError(name, f"unknown role '{raw_role}' ({hint})", line=number, field=f"{where}.{role_key}")
        if message.get("tool_calls"):
            raise InputError(name, "tool calls are not supported", line=number, field=f"{where}.tool_calls")
        content = _content(name, number, f"{where}.{content_key}", message.get(content_key))
        if role == "system" and i:
            raise InputError(name, "a system turn may only come first", line=number, field=where)
        turns.append({"role": role, "content": content})
    return turns


def split_turns(name: str, number: int, field: str, turns: list[Message],
                regenerate: bool = False) -> tuple[list[Message], str, str | None]:
    """(earlier turns, the last user turn's text, the assistant's answer to it if given)."""
    body = turns[1:] if turns[0]["role"] == "system" else turns
    if not body:
        raise InputError(name, "the conversation has no user turn", line=number, field=field)
    ending = None
    if body[-1]["role"] == "assistant":
        ending = body[-1]["content"]
        turns, body = turns[:-1], body[:-1]
        if not body or body[-1]["role"] != "user":
            raise InputError(name, "the final assistant turn does not answer a user turn", line=number, field=field)
    return turns[:-1], turns[-1]["content"], None if regenerate else ending


def _given_response(name: str, number: int, row: dict, field: str) -> str:
    found, value = lookup(row, field)
    if not found:
        present = ", ".join(map(str, row)) or "none"
        raise InputError(name, f"missing (fields present: {present}; choose one with `response_field`)",
                         line=number, field=field)
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        # TRL's conversational chosen/completion: one assistant message
        turn = parse_messages(name, number, field, value)[0]
        if turn["role"] != "assistant":
            raise InputError(name, f"expected an assistant message, got a {turn['role']} one", line=number, field=field)
        return turn["content"]
    return _string(name, number, field, value, "empty response")


def _content(name: str, number: int, where: str, content) -> str:
    if isinstance(content, list):           # OpenAI content parts
        texts = []
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else _kind(part)
                raise InputError(name, f"a '{kind}' part: only text content is supported", line=number,
                                 field=f"{where}[{j}]")
        content = "\n".join(texts)
    return _string(name, number, where, content, "empty turn")


def _string(name: str, number: int, field: str, value, empty: str) -> str:
    """A non-empty string without NUL, stripped; else the InputError saying which it is not."""
    if not isinstance(value, str):
        raise InputError(name, f"expected a string, got {_kind(value)}", line=number, field=field)
    if not value.strip():
        raise InputError(name, empty, line=number, field=field)
    _no_nul(name, number, field, value)
    return value.strip()


def _no_nul(name: str, number: int, field: str, value: str) -> None:
    """Refuse text no model or file should get: a NUL byte, or a lone surrogate (JSON can escape
    one, `\\ud800`; no UTF-8 holds it, so no record of it could be written)."""
    if "\x00" in value:
        raise InputError(name, "contains a NUL byte", line=number, field=field)
    if (bad := _SURROGATE.search(value)) is not None:
        raise InputError(name, f"contains a lone surrogate (\\u{ord(bad.group()):04x}), which is not text",
                         line=number, field=field)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _kind(value) -> str:
    return "null" if value is None else {dict: "an object", list: "a list"}.get(type(value), type(value).__name__)
