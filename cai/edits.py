"""Edit size between a pair's rejected and chosen sides, over whitespace-separated words (case
and punctuation count: a changed comma is a changed word).

`distance` is the word-level Levenshtein distance normalised by the longer side (0 identical,
1 nothing kept); `spans` counts the contiguous runs of inserted, deleted or replaced words, so
one rewritten sentence is one span and three scattered word swaps are three. The alignment is
difflib's over words, after the common head and tail are set aside; long texts are aligned
sentence by sentence first, then word by word inside the sentences that changed, which keeps
them cheap (difflib over 20,000 words with scattered edits takes a minute; this, a fraction of
a second). The figure is an alignment's, so at most the true Levenshtein distance's upper bound."""

from __future__ import annotations

from difflib import SequenceMatcher

WORDS_AT_ONCE = 3000          # past this many words a side, align sentences first


def edit_size(rejected: str, chosen: str) -> dict:
    """{"distance": 0-1, "spans": n} between two texts."""
    a, b = rejected.split(), chosen.split()
    if a == b:
        return {"distance": 0.0, "spans": 0}
    edits, spans = _edits(a, b)
    return {"distance": round(min(edits, max(len(a), len(b))) / max(len(a), len(b)), 4), "spans": spans}


def _edits(a: list[str], b: list[str]) -> tuple[int, int]:
    """(word edits, changed spans) of an alignment of a and b."""
    head, limit = 0, min(len(a), len(b))
    while head < limit and a[head] == b[head]:
        head += 1
    tail = 0
    while tail < limit - head and a[-1 - tail] == b[-1 - tail]:
        tail += 1
    a, b = a[head:len(a) - tail], b[head:len(b) - tail]
    if not a or not b:
        return len(a) + len(b), int(bool(a or b))      # one insertion or deletion, or nothing
    if max(len(a), len(b)) <= WORDS_AT_ONCE:
        return _count(SequenceMatcher(None, a, b, autojunk=False).get_opcodes())
    sa, sb = _sentences(a), _sentences(b)
    edits = spans = 0
    for tag, i1, i2, j1, j2 in SequenceMatcher(None, sa, sb, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        wa = [w for s in sa[i1:i2] for w in s]
        wb = [w for s in sb[j1:j2] for w in s]
        if not wa or not wb or max(len(wa), len(wb)) > WORDS_AT_ONCE:
            edits, spans = edits + max(len(wa), len(wb)), spans + 1     # too big to align: all changed
        else:
            e, s = _count(SequenceMatcher(None, wa, wb, autojunk=False).get_opcodes())
            edits, spans = edits + e, spans + s
    return edits, spans


def _count(opcodes) -> tuple[int, int]:
    changed = [(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in opcodes if tag != "equal"]
    return sum(max(pair) for pair in changed), len(changed)


def _sentences(words: list[str]) -> list[tuple[str, ...]]:
    """Words grouped into sentences (a word ending in . ! ? or : closes one), at most 60 words each."""
    out, current = [], []
    for word in words:
        current.append(word)
        if word[-1] in ".!?:" or len(current) >= 60:
            out.append(tuple(current))
            current = []
    if current:
        out.append(tuple(current))
    return out


def edit_of(record: dict) -> dict | None:
    """The edit size of a record (either shape); None when its sides are not texts."""
    from cai.messages import text_of

    try:
        return edit_size(text_of(record.get("rejected")), text_of(record.get("chosen")))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
