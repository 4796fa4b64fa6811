"""Pairs files for the review tests, made by the scripted backend (no model): kept pairs judged in
both orders, a pair the filters dropped (kept whole in the filtered file), a conversation with
earlier turns, and a hostile pair whose chosen text is HTML and a closing script tag."""

from __future__ import annotations

import json
from pathlib import Path

from cai.options import GenerateOptions
from cai.run.generate import run
from cai.backends.scripted import ScriptedBackend

PROMPTS = [f"How do I make tea number {i}?" for i in range(8)]
HOSTILE_ID = "hostile-pair"
HOSTILE = '<img src=x onerror=alert(1)> and </script><script>alert(1)</script>'


def make_pairs(folder: Path, *, hostile: bool = True, name: str = "pairs.jsonl") -> Path:
    """PAIRS (conversational shape, as chat transcripts need) and PAIRS.filtered.jsonl in `folder`."""
    prompts = folder / "prompts.jsonl"
    lines = [json.dumps({"id": f"tea-{i}", "prompt": p}) for i, p in enumerate(PROMPTS)]
    lines.append(json.dumps({"id": "chat-1", "messages": [
        {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "How hot should water be for green tea?"}]}))
    prompts.write_text("\n".join(lines) + "\n")
    out = folder / name
    summary = run(str(prompts), str(out), GenerateOptions(
        model=ScriptedBackend(unchanged={PROMPTS[1]}), filter=True, judge=True, keep_filtered=True,
        max_new_tokens=16, format="conversational"))
    assert summary.kept == len(PROMPTS) and summary.dropped == 1, summary
    if hostile:
        first = json.loads(out.read_text().splitlines()[0])
        bad = {**first, "id": HOSTILE_ID, "prompt": [{"role": "user", "content": "Say </script> please"}],
               "chosen": [{"role": "assistant", "content": HOSTILE}]}
        with out.open("a") as fp:
            fp.write(json.dumps(bad) + "\n")
    return out


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
