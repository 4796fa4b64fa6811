"""AI-feedback preference labels, as in RL-CAI: a judge model sees the conversation and the
principle's multiple-choice question with options (A) and (B), and its preference is read from
the log-probabilities of the two option tokens. Both orders are scored (the revision as (B),
then as (A)) and averaged, which cancels the judge's bias toward a position."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cai.backends.base import Backend
from cai.constitution import Constitution
from cai.templates import JUDGE, Templates
from cai.messages import text_of as _text

DEFAULT_QUESTION = "Which of these assistant responses is better?"
CHOICES = ("A", "B")


@dataclass(frozen=True)
class JudgeConfig:
    prefix: str = "The answer is: ("                # how the judge's reply starts; the option letter comes next
    clamp: tuple[float, float] | None = None        # soft labels: the label is the preference clamped to this range


def preference_of(logprobs: dict[str, float], letter: str) -> float:
    """P(letter) with the probability renormalised over the two options."""
    other = CHOICES[1] if letter == CHOICES[0] else CHOICES[0]
    mine, theirs = logprobs.get(letter, -math.inf), logprobs.get(other, -math.inf)
    if mine == theirs:                   # both -inf included: no evidence either way
        return 0.5
    return 1.0 / (1.0 + math.exp(min(theirs - mine, 700.0)))


class Judge:
    def __init__(self, backend: Backend, constitution: Constitution | None, templates: Templates,
                 config: JudgeConfig = JudgeConfig()):
        from cai.backends.base import Scoring
        from cai.errors import OptionError

        if not isinstance(backend, Scoring):
            raise OptionError("judge", f"{backend.model_name} cannot be a judge: its backend reads no "
                                       "log-probabilities (score_choices)")
        self.backend, self.constitution, self.templates, self.config = backend, constitution, templates, config
        self.model_name = backend.model_name

    def question(self, record: dict) -> str:
        """The principle's `choice` wording, or a generic question when it has none."""
        if self.constitution is not None:
            try:
                choice = self.constitution.principle(record.get("principle")).choice
            except KeyError:
                choice = None
            if choice:
                return choice
        return DEFAULT_QUESTION

    def conversation(self, record: dict, question: str, a: str, b: str) -> list[dict[str, str]]:
        content = self.templates.render(JUDGE, prompt=_transcript(record), question=question, a=a, b=b)
        return [{"role": "user", "content": content}]

    def label(self, records: list[dict]) -> list[str | None]:
        """Adds a `judge` field to each record, in place; returns, per record, None or the reason
        it could not be judged. `judge.preference` is the probability that the revision is the
        better response, averaged over both orders; `judge.orders` holds the two orders' own
        figures (revision shown as (B), then as (A)); `judge.agree` is false where one order prefers
        the revision and the other the original; `judge.label` is the preference clamped."""
        conversations, questions = [], []
        for record in records:
            if (record.get("judge") or {}).get("swapped"):      # judged and swapped before: judge it afresh
                record["chosen"], record["rejected"] = record["rejected"], record["chosen"]
                del record["judge"]
            original, revision = _text(record["rejected"]), _text(record["chosen"])
            questions.append(question := self.question(record))
            conversations += [self.conversation(record, question, original, revision),
                              self.conversation(record, question, revision, original)]
        scores = self.backend.score_choices(conversations, CHOICES, prefix=self.config.prefix)
        errors: list[str | None] = []
        for i, record in enumerate(records):
            second, first = scores[2 * i], scores[2 * i + 1]
            error = second.error or first.error or _not_numbers(second.logprobs, first.logprobs)
            errors.append(error)
            if error:
                continue
            orders = [preference_of(second.logprobs, "B"), preference_of(first.logprobs, "A")]
            preference = sum(orders) / 2
            record["judge"] = {"model": self.model_name, "question": questions[i],
                               "preference": round(preference, 6), "orders": [round(p, 6) for p in orders],
                               "agree": orders_agree(orders), "label": round(self.clamp(preference), 6),
                               "swapped": False}
        return errors

    def clamp(self, p: float) -> float:
        if self.config.clamp is None:
            return p
        low, high = self.config.clamp
        return min(max(p, low), high)


def _not_numbers(*logprobs: dict[str, float]) -> str | None:
    """Why these option log-probabilities cannot be read as a preference (NaN, +inf or a
    positive value: a backend's arithmetic or a server gone wrong), or None when they can."""
    for scores in logprobs:
        for choice, value in scores.items():
            if not isinstance(value, (int, float)) or math.isnan(value) or value > 1e-6:
                return f"the judge's log-probability of ({choice}) is {value!r}, not a log-probability"
    return None


def orders_agree(orders) -> bool:
    """False when one order prefers the revision (> 0.5) and the other the original (< 0.5): the
    judge's verdict then turns on where the revision was shown."""
    first, second = orders
    return not ((first > 0.5 and second < 0.5) or (first < 0.5 and second > 0.5))


def decisive_preference(judge: dict, trust_disagreeing: bool = False) -> float:
    """The preference a keep-or-drop decision reads: a tie (0.5) where the orders disagree,
    unless `trust_disagreeing`."""
    agree = judge.get("agree")
    if agree is None and isinstance(judge.get("orders"), list) and len(judge["orders"]) == 2:
        agree = orders_agree(judge["orders"])
    return judge["preference"] if trust_disagreeing or agree is not False else 0.5


def _transcript(record: dict) -> str:
    """The prompt the judge is shown after its template's 'Human: ': the prompt itself, or for a
    conversation its earlier turns as a Human/Assistant transcript ending with the prompt."""
    from cai.records import conversation_of

    _, history, prompt = conversation_of(record)
    turns = [f"{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in history]
    return "\n\n".join([*turns, f"Human: {prompt}"]).removeprefix("Human: ")


def swap(record: dict) -> dict:
    """The record with chosen and rejected exchanged (the judge preferred the original); the
    judge's label is then the probability of the new chosen side."""
    judge = record["judge"]
    return {**record, "chosen": record["rejected"], "rejected": record["chosen"],
            "judge": {**judge, "swapped": True, "label": round(1 - judge["label"], 6)}}
