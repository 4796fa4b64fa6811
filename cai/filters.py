"""Clean-up and filters for generated pairs. Pure Python: a record goes in, the record with its
`chosen` cleaned and the reasons (if any) to drop it come out.

Small models wrap a revision in preambles ("Sure, here is the revised response:"), run on into
the next chat turn, copy the critique instead of rewriting, or return the original unchanged.
Clean-up removes what can be removed without guessing; the filters drop what cannot be saved,
each with a reason code that run summaries count.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

from cai.records import Record

REASONS = {
    "empty": "the revision or the original response is empty",
    "unchanged": "the revision is (nearly) identical to the original response",
    "truncated": "the response or the revision hit `max_new_tokens`",
    "meta": "the revision talks about the response, the critique or the rewriting instead of answering",
    "copied": "the revision copies the critique or a worked example instead of rewriting the response",
    "repetitive": "the revision repeats itself",
    "refusal": "the revision refuses (`drop_refusals`)",
    "judge": "the judge preferred the revision less than `min_preference`",
    "reasoning": "a reasoning tag (<think>…) is left in the revision, the original response or a critique",
}
DEFAULT_CHECKS = ("empty", "unchanged", "truncated", "meta", "copied", "repetitive", "reasoning")

# --- clean-up -------------------------------------------------------------------------------

_FLAGS = re.I | re.X
# "Revision:", "**Revised response:**", "Assistant:", "Final answer (safer):"
_INTERJECTION = r"(?:(?:sure|okay|ok|certainly|of\ course|absolutely|alright|great)[\s,.!]+)?"
_LABEL = re.compile(rf"""^\s*{_INTERJECTION}(?:\*\*|\#+\s*)?
    (?:assistant|ai|revision|rewrite|(?:revised|rewritten|improved|updated|new|final|corrected|better|safer)
       (?:\s+(?:response|answer|reply|version|text))?|response|answer)
    (?:\s*\([^)\n]{{0,80}}\))?\s*(?:\*\*)?\s*:\s*(?:\*\*)?\s*""", _FLAGS)
# A lead-in up to a colon or the end of its line: "Sure, here is a revised response that ...:",
# "Based on the critique above, here's a better answer:", "I have revised the response:"
_EDITED = r"(?:revised|rewritten|improved|updated|new|better|safer|corrected|edited|final|cleaner|more\ \w+|less\ \w+)"
_LEAD_IN = re.compile(rf"""^\s*{_INTERJECTION}
    (?:(?:here(?:'s|\ is|\ are)|below\ is|this\ is)\ (?:a\ |an\ |the\ |my\ |your\ )?(?:\w+\ ){{0,2}}?{_EDITED}
         \ (?:version|response|answer|reply|rewrite|revision|text)
      |(?:here(?:'s|\ is)|below\ is)\ (?:a|the|my)\ (?:rewrite|revision)
      |i(?:'ve|\ have)?\ (?:revised|rewritten|rewrote|updated|edited|improved)
      |(?:based\ on|following|taking\ into\ account|in\ light\ of|according\ to)\ (?:the|your|my|this)
         \ (?:critique|feedback|review|suggestions?|points?))
    [^\n:]{{0,160}}(?::|\n)\s*""", _FLAGS)
_QUOTES = (('"', '"'), ("“", "”"), ("'", "'"))
# Where a model ran on into the next turn: a chat-template marker or a role label on its own line.
_TEMPLATE_MARKER = re.compile(r"<\|im_start\|>|<\|start_header_id\|>|\[INST\]|<start_of_turn>|<\|(?:user|assistant|system)\|>")
_ROLE_LINE = re.compile(r"\n[ \t]*(?:\*\*)?(?:user|human|assistant|critique(?:\ request)?|revision\ request)(?:\*\*)?[ \t]*:", _FLAGS)
# Prompts that ask for dialogue may rightly get "User:" lines back.
_DIALOGUE = re.compile(r"\b(?:dialog(?:ue)?s?|conversations?|script|transcript|chat\ log|interview)\b|^\s*\w+\s*:", _FLAGS | re.M)
_END_MARKERS = re.compile(r"<\|im_end\|>|<\|endoftext\|>|<\|eot_id\|>|<\|end\|>|<end_of_turn>|</s>|<s>|\[/INST\]")
# A closing note about the edit: "(Note: I removed the instructions for ...)"
_TRAILING_NOTE = re.compile(r"""\n\s*\(?\s*(?:\*\*)?note(?:\*\*)?\s*:[^\n]*
    (?:revis|rewr|remov|chang|edit|critique|original|previous)[^\n]*\)?\s*$""", _FLAGS)


def strip_debris(text: str, prompt: str = "") -> tuple[str, list[str]]:
    """Cut a reply where it runs on into another chat turn (a chat-template marker, or a role
    label starting a line unless the prompt asks for dialogue), and drop stray end-of-turn markers."""
    notes = []
    found = _TEMPLATE_MARKER.search(text)
    role = None if _DIALOGUE.search(prompt) else _ROLE_LINE.search(text)
    if role and (not found or role.start() < found.start()):
        found = role
    if found and found.start() > 0:
        notes.append(f"next turn: {_clip(text[found.start():])}")
        text = text[:found.start()]
    if _END_MARKERS.search(text):
        notes.append("end-of-turn markers")
        text = _END_MARKERS.sub("", text)
    return text.strip(), notes


def clean_revision(text: str, prompt: str = "") -> tuple[str, list[str]]:
    """The revision without the labels and lead-ins around it, the next-turn debris after it, and
    quotes wrapped around all of it; with a note of each thing removed."""
    text, notes = strip_debris(text, prompt)
    for _ in range(3):                      # "Sure! Revision: Here is the new answer: …"
        found = _LABEL.match(text) or _LEAD_IN.match(text)
        if not found or found.end() >= len(text):
            break
        notes.append(f"preamble: {_clip(found.group(0))}")
        text = text[found.end():].lstrip()
    note = _TRAILING_NOTE.search(text)
    if note and note.start() > 0:
        notes.append(f"closing note: {_clip(note.group(0))}")
        text = text[:note.start()].rstrip()
    for left, right in _QUOTES:
        inner = text[1:-1]
        if len(text) > 2 and text[0] == left and text[-1] == right and left not in inner and right not in inner:
            notes.append("wrapping quotes")
            text = inner.strip()
            break
    return text, notes


def _clip(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


# --- measures -------------------------------------------------------------------------------

Words = list[str]


def words(text: str | Words) -> Words:
    """Lower-cased words without punctuation (a list passes through: the measures below take
    either, so a text used many times is split once)."""
    return text if isinstance(text, list) else re.findall(r"\w+", text.lower())


def similarity(a: str | Words, b: str | Words) -> float:
    """1.0 for the same words in the same order, 0.0 for nothing in common (difflib's ratio over
    lower-cased words, so punctuation, case and spacing do not count)."""
    wa, wb = words(a), words(b)
    if not wa and not wb:
        return 1.0
    return difflib.SequenceMatcher(None, wa, wb, autojunk=False).ratio()


def containment(a: str | Words, b: str | Words, n: int = 4) -> float:
    """The share of `a`'s word n-grams that also occur in `b` (how much of `a` is copied from `b`)."""
    wa, wb = words(a), words(b)
    if len(wa) < n:
        return 1.0 if wa and " ".join(wa) in " ".join(wb) else 0.0
    grams = {tuple(wa[i:i + n]) for i in range(len(wa) - n + 1)}
    other = {tuple(wb[i:i + n]) for i in range(len(wb) - n + 1)}
    return len(grams & other) / len(grams)


def distinct_ratio(text: str | Words, n: int = 3) -> float:
    """Distinct word n-grams over all n-grams: low when the text loops."""
    w = words(text)
    if len(w) < n:
        return 1.0
    grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams)


# The revision speaking about the exchange rather than answering the user.
_META_START = re.compile(r"""^\W*(?:the|your|this|my|that|its)\s+(?:original\s+|previous\s+|initial\s+|above\s+|last\s+
    |assistant'?s?\s+|ai'?s?\s+)*(?:response|reply|request|critique|revision|rewrite)\b""", _FLAGS)
_META_ANYWHERE = [re.compile(p, _FLAGS) for p in (
    r"\b(?:the|my|your|this)\s+(?:original|previous|initial|earlier|above|last|first)\s+(?:response|answer|reply|version)\b",
    r"\bthe\s+assistant'?s\s+(?:response|answer|reply)\b",
    r"\bcritiques?\b",
    r"\b(?:revised|rewritten|improved|updated)\s+(?:response|answer|reply|version)\b",
    r"\bi\s+(?:have\s+|'ve\s+)?(?:revised|rewritten|rewrote|edited)\b",
    r"\b(?:here\s+is|here's)\s+(?:the|a|my)\s+(?:new|revised|improved|rewritten)\b",
)]
_REFUSAL = re.compile(r"""(?:^\W*(?:i'?m\s+sorry|i\s+am\s+sorry|sorry|i\s+apologi[sz]e|unfortunately)\b
    |^\W*(?:i\s+can(?:'|no)?t|i\s+cannot|i\s+won'?t|i\s+will\s+not|i'?m\s+(?:not\s+able|unable)|i\s+am\s+(?:not\s+able|unable)
        |i\s+(?:must|have\s+to)\s+(?:decline|refuse)|as\s+an\s+ai)\b
    |\bi\s+(?:can(?:'|no)?t|cannot|won'?t|will\s+not|am\s+(?:not\s+able|unable)\s+to)\s+(?:help|assist|provide|do\s+that|comply))""",
                      _FLAGS)


def starts_with_preamble(text: str) -> bool:
    """Whether a text opens with a role label, a lead-in about the rewrite, or talk about "the
    response" (what no kept `chosen` may start with)."""
    return bool(_LABEL.match(text) or _LEAD_IN.match(text) or _META_START.search(text))


def is_refusal(text: str) -> bool:
    return bool(_REFUSAL.search(text))


def talks_about_itself(text: str, prompt: str = "") -> bool:
    """Whether a revision describes the response or the edit instead of being the answer. A
    phrase that the user's prompt itself uses ("write a critique of …") does not count."""
    if _META_START.search(text) and not _META_START.search(prompt):
        return True
    return any(p.search(text) and not p.search(prompt) for p in _META_ANYWHERE)


# --- the filters ----------------------------------------------------------------------------

@dataclass(frozen=True)
class FilterConfig:
    checks: tuple[str, ...] = DEFAULT_CHECKS      # reason codes to drop for; "refusal" is opt-in
    similarity: float = 0.9      # unchanged: similarity(chosen, rejected) at least this
    copied: float = 0.7          # copied: this share of the revision's 4-grams found in a critique or example
    repetition: float = 0.5      # repetitive: distinct 3-grams below this share, in a revision of 24+ words
    references: tuple[str, ...] = ()   # texts a revision must not copy: the worked examples' turns
    reasoning_tags: tuple[str, str] = ("<think>", "</think>")   # none of them may be left in a pair


@dataclass
class Verdict:
    record: Record                     # the record with `chosen` cleaned (and meta.cleaned noted)
    reasons: list[str] = field(default_factory=list)
    similarity: float = 0.0            # of the cleaned chosen to rejected
    judge_error: str | None = None     # why the judge could not label it

    @property
    def kept(self) -> bool:
        return not self.reasons


class Filters:
    def __init__(self, config: FilterConfig = FilterConfig()):
        unknown = set(config.checks) - set(REASONS)
        if unknown:
            raise ValueError(f"unknown filter(s): {', '.join(sorted(unknown))}")
        self.config = config
        self._references = [words(text) for text in config.references]

    def apply(self, record: Record) -> Verdict:
        """Clean `record` (a standard-shape record as the pipeline makes it) and judge it. The raw
        revision stays in `rounds`; `chosen` becomes the cleaned one."""
        prompt = record.get("prompt") if isinstance(record.get("prompt"), str) else ""
        chosen, notes = clean_revision(record["chosen"], prompt)
        rejected, rejected_notes = strip_debris(record["rejected"], prompt)
        record = {**record, "chosen": chosen, "rejected": rejected}
        cleaned = notes + [f"rejected {note}" for note in rejected_notes]
        if cleaned:
            record["meta"] = {**record.get("meta", {}), "cleaned": cleaned}
        said = words(chosen)
        verdict = Verdict(record, similarity=similarity(said, rejected))
        checks, c = self.config.checks, self.config
        found = verdict.reasons
        if not said or not words(rejected):
            found.append("empty")
        else:
            if verdict.similarity >= c.similarity:
                found.append("unchanged")
            if talks_about_itself(chosen, prompt):
                found.append("meta")
            critiques = [r.get("critique", "") for r in record.get("rounds", [])] or [record.get("critique", "")]
            sources = [words(text) for text in critiques if text] + self._references
            if any(containment(said, source) >= c.copied or similarity(said, source) >= c.similarity
                   for source in sources if source):
                found.append("copied")
            if len(said) >= 24 and distinct_ratio(said) < c.repetition:
                found.append("repetitive")
            if is_refusal(chosen):
                found.append("refusal")
        critiques = [r.get("critique") for r in record.get("rounds", [])] + [record.get("critique")]
        if any(tag in text for tag in c.reasoning_tags
               for text in (chosen, rejected, *(t for t in critiques if isinstance(t, str)))):
            found.append("reasoning")
        reasons = (record.get("meta") or {}).get("finish_reasons") or {}
        if "length" in (reasons.get("response"), *(reasons.get("revision") or ())[-1:]):
            found.append("truncated")
        verdict.reasons = [r for r in found if r in checks]
        return verdict


def references_of(constitution) -> tuple[str, ...]:
    """The texts of a constitution's worked examples that a revision should not reproduce: their
    critiques and revisions."""
    texts = []
    for example in getattr(constitution, "few_shot", ()):
        texts += [example.critique, example.revision]
    return tuple(t for t in texts if t)


def curate(records: list[Record], filters: Filters | None = None, judge=None,
           min_preference: float | None = None, swap: bool = False,
           trust_disagreeing: bool = False) -> list[Verdict]:
    """Clean and filter `records`, then (with a `judge`) label the pairs that survived, swap
    chosen/rejected where the judge preferred the original (`swap`), and drop those whose
    chosen side it preferred less than `min_preference`. One verdict per record, in order; a
    pair the judge could not score is kept unlabelled (its `judge_error` says why), or dropped
    for "judge" when a minimum preference is asked for. Where the judge's two orders disagree
    the pair counts as a tie (0.5) against `min_preference`, unless `trust_disagreeing`."""
    from cai.judging import decisive_preference, swap as swapped

    verdicts = [filters.apply(r) if filters else Verdict(r) for r in records]
    if judge is None:
        return verdicts
    alive = [v for v in verdicts if v.kept]
    for verdict, error in zip(alive, judge.label([v.record for v in alive])):
        verdict.judge_error = error
        if error:
            if min_preference is not None:
                verdict.reasons.append("judge")
            continue
        preference = verdict.record["judge"]["preference"]
        if swap and preference < 0.5:
            verdict.record, preference = swapped(verdict.record), 1 - preference
        if min_preference is not None and decisive_preference(
                {**verdict.record["judge"], "preference": preference}, trust_disagreeing) < min_preference:
            verdict.reasons.append("judge")
    return verdicts
