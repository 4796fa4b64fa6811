"""Reasoning models think before they answer: in `<think>…</think>` inside the reply, or apart
(the `reasoning_content` an OpenAI-compatible server returns). A turn's reasoning never becomes
part of `chosen`, `rejected` or the history the later turns see; under `keep` it is stored apart.

Modes (`--reasoning`):
  auto   off where the model can be told not to think (its chat template's switch), else drop
  off    tell the model not to think (the template's `enable_thinking=False`; for a server,
         `chat_template_kwargs`); any reasoning it still writes is dropped
  keep   let it think; store each turn's reasoning in the record, apart from the text
  drop   let it think; throw the reasoning away
"""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("auto", "off", "keep", "drop")
DEFAULT_TAGS = ("<think>", "</think>")


@dataclass(frozen=True)
class Split:
    answer: str                 # the text without its reasoning
    reasoning: str | None       # the reasoning, None when there was none
    unfinished: bool = False    # the turn ended while still thinking (no answer yet)


def parse_tags(spec: str | tuple[str, str] | None) -> tuple[str, str]:
    """('<think>', '</think>') from 'OPEN,CLOSE' (or a pair); a bare tag name gets its brackets."""
    if spec is None:
        return DEFAULT_TAGS
    if isinstance(spec, (tuple, list)):
        parts = list(spec)
    else:
        parts = [p.strip() for p in str(spec).split(",")]
        if len(parts) == 1 and parts[0] and not parts[0].startswith("<"):
            parts = [f"<{parts[0]}>", f"</{parts[0]}>"]
    if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
        raise ValueError(f"expected OPEN,CLOSE such as <think>,</think> (got '{spec}')")
    return parts[0], parts[1]


def split(text: str, apart: str | None = None, tags: tuple[str, str] = DEFAULT_TAGS) -> Split:
    """The answer and the reasoning of one turn. `apart` is reasoning the backend returned on its
    own. Inline reasoning is what comes before the closing tag (templates that open the think
    block in the generation prompt leave no opening tag in the reply) or between an opening tag
    at the start and its close, and any whole block further on (after a lead-in such as
    'Critique: '); an opening tag with no close means the turn stopped mid-thought."""
    open_tag, close_tag = tags
    parts = [apart.strip()] if apart and apart.strip() else []
    body = text.lstrip()
    unfinished = False
    close = body.find(close_tag)
    opened = body.startswith(open_tag)
    if opened and close < 0:
        parts.append(body[len(open_tag):].strip())
        body, unfinished = "", True
    elif close >= 0 and (opened or open_tag not in body[:close]):
        inner = body[len(open_tag):close] if opened else body[:close]
        parts.append(inner.strip())
        body = body[close + len(close_tag):]
    # a whole block after a lead-in ("Critique: <think>…</think> The answer…"): taken out too
    while (start := body.find(open_tag)) >= 0 and (end := body.find(close_tag, start)) >= 0:
        parts.append(body[start + len(open_tag):end].strip())
        lead, rest = body[:start].rstrip(), body[end + len(close_tag):].lstrip()
        body = f"{lead} {rest}" if lead and rest else lead or rest
    reasoning = "\n\n".join(p for p in parts if p)
    return Split(body.strip(), reasoning if parts else None, unfinished)


def resolve(mode: str, switch: bool | None) -> str:
    """The mode a run uses: `auto` is `off` where the backend says the model has a thinking
    switch, else `drop`."""
    if mode == "auto":
        return "off" if switch else "drop"
    return mode
