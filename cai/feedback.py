"""The Constitutional AI paper's second stage (RL-CAI): sample N answers to each prompt from the
policy model, have a feedback model compare them under K principles of the constitution (each a
multiple-choice question read from the option log-probabilities, in both orders: see
cai.judging), and make preference pairs of the comparisons: best against worst, or every pair
whose margin is at least `min_margin`. Knows nothing of the terminal or of files."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from itertools import combinations
from typing import Callable, Iterable, Iterator

from cai import __version__
from cai import reasoning as thinking
from cai.backends.base import Backend, Completion, Request, SamplingParams
from cai.constitution import Constitution, Principle
from cai.errors import BackendError, OptionError
from cai.judging import CHOICES, DEFAULT_QUESTION, JudgeConfig, _not_numbers, _transcript, orders_agree, preference_of
from cai.messages import PromptItem
from cai.pipeline import Job, Pipeline, RunConfig, Unfit, _derive_seed
from cai.templates import JUDGE, Templates

COT_REQUEST = "Let's think step by step."       # what the feedback model is asked before it reasons
COT_CLAMP = (0.4, 0.6)                           # the paper's clamp of chain-of-thought labels
COT_TOKENS = 256                                 # most tokens of a chain of thought
# what a server says when it gives no option log-probabilities at all (cai.backends.openai_wire):
# retrying will not help, so the run stops rather than fail every prompt
CANNOT_SCORE = ("returned no logprobs", "returned no top_logprobs", "the server does not take")


@dataclass(frozen=True)
class FeedbackConfig:
    samples: int = 2                              # answers per prompt (N)
    principles: int = 1                           # principles asked per comparison (K)
    min_margin: float | None = None               # None: best against worst; else every pair this decided
    cot: bool = False                             # reason step by step before answering
    judge: JudgeConfig = JudgeConfig()            # the answer's prefix, the labels' clamp
    cot_tokens: int = COT_TOKENS

    def describe(self, model: str) -> dict:
        """What the run's fingerprint records of the feedback: a different one makes other records."""
        return {"samples": self.samples, "principles": self.principles, "min_margin": self.min_margin,
                "cot": self.cot, "model": model, "clamp": list(self.judge.clamp) if self.judge.clamp else None,
                "prefix": self.judge.prefix}


def pair_id(prompt_id: str, i: int, j: int) -> str:
    """The record id of the pair of samples i and j of a prompt (every-pair mode)."""
    return f"{prompt_id}#{i}-{j}"


def draw_principles(constitution: Constitution, key: str, k: int, seed: int) -> list[Principle]:
    """K different principles for one comparison, weighted by the principles' weights; they
    depend only on (seed, key), so a resumed or re-batched run asks the same."""
    rng = random.Random(f"{seed}\x1ffeedback\x1f{key}")
    pool, chosen = list(constitution.principles), []
    while len(chosen) < k:
        pick = rng.choices(pool, weights=[p.weight for p in pool])[0]
        pool.remove(pick)
        chosen.append(pick)
    return chosen


@dataclass
class Outcome:
    """What one prompt came to: its records (none when no pair was decided enough), or why it
    was dropped (`dropped`), or why it failed (`failed`: stage, reason)."""

    job: Job
    records: list[dict] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    failed: tuple[str, str] | None = None


@dataclass
class _Prompt:
    job: Job
    messages: list[dict]
    completions: list[Completion | None]
    spent: list[int] = field(default_factory=lambda: [0, 0])

    @property
    def ready(self) -> bool:
        return all(c is not None for c in self.completions)


class FeedbackModel:
    """The feedback model's side: compares two answers to a prompt under principles, both orders
    each, optionally after reasoning step by step (`cot`)."""

    def __init__(self, backend: Backend, constitution: Constitution, templates: Templates, config: FeedbackConfig):
        self.backend, self.constitution, self.templates, self.config = backend, constitution, templates, config
        self.model_name = backend.model_name
        if not callable(getattr(backend, "score_choices", None)):
            raise OptionError("judge_model", f"{self.model_name} cannot give option log-probabilities "
                                             "(its backend has no score_choices)")

    def question(self, principle: Principle) -> str:
        return principle.choice or DEFAULT_QUESTION

    def _shot_question(self, shot) -> str:
        if shot.principle:
            return self.question(self.constitution.principle(shot.principle))
        return shot.question or DEFAULT_QUESTION

    def conversation(self, item: PromptItem, principle: Principle, a: str, b: str) -> list[dict]:
        record = {"prompt": item.text, "history": list(item.history)}
        content = self.templates.render(JUDGE, prompt=_transcript(record), question=self.question(principle),
                                        a=a, b=b)
        examples = []
        for shot in self.constitution.feedback_examples:
            examples += _example_turns(self.templates, shot, self.config, self._shot_question(shot))
        if self.config.cot:
            content += "\n\n" + COT_REQUEST
        return [*examples, {"role": "user", "content": content}]

    def compare(self, item: PromptItem, answers: list[str], pairs: list[tuple[int, int]],
                principles: dict[tuple[int, int], list[Principle]]) -> dict[tuple[int, int], dict] | str:
        """For each pair (i, j): the probability that answer i is the better, as
        {"preference", "orders", "principles", "agree", "cot"}; or why the comparisons could not be
        scored (the first reason). One scoring call per prompt, so a run's batching never changes
        which conversations are scored together."""
        conversations, index = [], []
        for i, j in pairs:
            for principle in principles[(i, j)]:
                index.append((i, j, principle))
                conversations += [self.conversation(item, principle, answers[i], answers[j]),
                                  self.conversation(item, principle, answers[j], answers[i])]
        thoughts: list[str] = []
        if self.config.cot:
            params = SamplingParams(max_new_tokens=self.config.cot_tokens, temperature=0.0, top_p=1.0)
            made = self.backend.generate(conversations, params, seed=0)
            for completion in made:
                if completion.error is not None:
                    return f"the feedback model's reasoning failed: {completion.error}"
            thoughts = [c.text.strip() for c in made]
            scores = []
            for conversation, thought in zip(conversations, thoughts):
                scores += self.backend.score_choices([conversation], CHOICES,
                                                     prefix=thought + "\n" + self.config.judge.prefix)
        else:
            scores = self.backend.score_choices(conversations, CHOICES, prefix=self.config.judge.prefix)
        results: dict[tuple[int, int], dict] = {}
        for n, (i, j, principle) in enumerate(index):
            first, second = scores[2 * n], scores[2 * n + 1]
            error = first.error or second.error or _not_numbers(first.logprobs, second.logprobs)
            if error:
                return error
            orders = [round(preference_of(first.logprobs, "A"), 6), round(preference_of(second.logprobs, "B"), 6)]
            entry = results.setdefault((i, j), {"principles": [], "orders": [], "agree": [], "cot": []})
            entry["principles"].append(principle.id)
            entry["orders"].append(orders)
            entry["agree"].append(orders_agree(orders))
            if self.config.cot:
                entry["cot"].append([thoughts[2 * n], thoughts[2 * n + 1]])
        for entry in results.values():
            flat = [p for orders in entry["orders"] for p in orders]
            entry["preference"] = round(sum(flat) / len(flat), 6)
            if not self.config.cot:
                del entry["cot"]
        return results

    def clamp(self, p: float) -> float:
        bounds = self.config.judge.clamp
        return p if bounds is None else min(max(p, bounds[0]), bounds[1])


def _example_turns(templates: Templates, shot, config: FeedbackConfig, asked: str) -> list[dict]:
    """A worked feedback example from the constitution as an earlier exchange: the question, and
    the answer (with its reasoning under `cot`)."""
    question = templates.render(JUDGE, prompt=shot.prompt, question=asked, a=shot.a, b=shot.b)
    if config.cot:
        question += "\n\n" + COT_REQUEST
    answer = ((shot.reasoning.strip() + "\n") if config.cot and shot.reasoning else "") + config.judge.prefix \
        + shot.answer + ")"
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


class SampledPipeline:
    """N samples per prompt from the policy, compared by the feedback model; yields one Outcome
    per prompt, batch by batch, as its comparisons finish."""

    def __init__(self, policy: Backend, feedback: FeedbackModel, constitution: Constitution,
                 templates: Templates, config: RunConfig, feedback_config: FeedbackConfig):
        self.policy, self.feedback, self.constitution = policy, feedback, constitution
        self.config, self.fb = config, feedback_config
        # the policy's side is the critique pipeline's first turn: its opening, fit and reasoning
        self.base = Pipeline(policy, constitution, templates, replace(config, revisions=0))
        if self.fb.principles > len(constitution.principles):
            raise OptionError("principles_per_comparison", f"is {self.fb.principles}, but {constitution.ref} has "
                              f"{len(constitution.principles)} principles")

    def plan(self, prompts: Iterable[PromptItem], todo: Callable[[str], bool] | None = None,
             truncate_long: bool = False) -> tuple[list[Job], list[tuple[PromptItem, str, Unfit]]]:
        """One job per prompt still to make (`todo(prompt id)`; None: every one), and the prompts left out."""
        jobs, left_out = [], []
        for item in prompts:
            if todo is not None and not todo(item.id):
                continue
            job, problem = self.base.job(item, item.id, (), truncate_long)
            if problem:
                left_out.append((item, item.id, problem))
            else:
                jobs.append(job)
        return jobs, left_out

    def fingerprint(self) -> dict:
        return self.base.fingerprint()

    def run(self, jobs: list[Job], on_turn: Callable[[str, Completion], None] | None = None,
            stop: Callable[[], bool] | None = None) -> Iterator[list[Outcome]]:
        n = self.fb.samples
        width = max(n, self.config.batch_size)
        longest = max((j.tokens or 0 for j in jobs), default=0) or None
        stream = self.policy.stream(self.config.params, max(1, min(width, n * len(jobs))), longest)
        waiting, work = deque(jobs), {}
        in_flight = 0
        while True:
            while waiting and in_flight + n <= width and not (stop and stop()):
                job = waiting.popleft()
                w = work[job.record_id] = _Prompt(job, self.base.builder.opening(job.prompt.text, job.prompt.history),
                                                  [None] * n)
                for i in range(n):
                    stream.submit(Request(f"{job.record_id}\x1f{i}", list(w.messages),
                                          _derive_seed(self.config.seed, f"sample {i}", job.record_id)))
                in_flight += n
            if not work:
                return
            finished = stream.poll()
            if not finished:
                raise RuntimeError(f"backend stream returned nothing with {in_flight} samples in flight")
            outcomes = []
            for key, completion in finished:
                stream.release(key)
                in_flight -= 1
                record_id, number = key.rsplit("\x1f", 1)
                w = work.get(record_id)
                if w is None:                   # its prompt already failed
                    continue
                if completion.error is not None:
                    del work[record_id]
                    outcomes.append(Outcome(w.job, failed=(f"sample {int(number) + 1}", completion.error)))
                    continue
                part = thinking.split(completion.text, completion.reasoning, self.config.reasoning_tags)
                w.completions[int(number)] = replace(completion, text=part.answer, reasoning=part.reasoning,
                                                     finish_reason="length" if part.unfinished
                                                     else completion.finish_reason)
                w.spent[0] += completion.prompt_tokens
                w.spent[1] += completion.completion_tokens
                if on_turn:
                    on_turn("sample", completion)
                if w.ready:
                    del work[record_id]
                    outcomes.append(self._judge(w))
            # a prompt whose sample failed may still have samples in flight: they are dropped as they come
            if outcomes:
                yield outcomes

    def _judge(self, w: _Prompt) -> Outcome:
        job, n = w.job, self.fb.samples
        answers = [c.text for c in w.completions]
        pairs = list(combinations(range(n), 2))
        principles = {(i, j): draw_principles(self.constitution, f"{job.record_id}\x1f{i}-{j}", self.fb.principles,
                                              self.config.seed) for i, j in pairs}
        try:
            results = self.feedback.compare(job.prompt, answers, pairs, principles)
        except BackendError as exc:
            results = str(exc)
        if isinstance(results, str):
            if any(mark in results for mark in CANNOT_SCORE):
                # a model that gives no option log-probabilities at all: no prompt can be labelled
                raise BackendError(f"the feedback model {self.feedback.model_name} cannot be scored: {results}")
            return Outcome(job, failed=("feedback", results))
        if self.fb.min_margin is None:
            chosen = [self._best_worst(results)]
        else:
            chosen = []
            for (i, j), entry in results.items():
                p = entry["preference"]
                if abs(2 * p - 1) >= self.fb.min_margin:
                    chosen.append((i, j) if p >= 0.5 else (j, i))
            if not chosen:
                best = max(abs(2 * e["preference"] - 1) for e in results.values())
                return Outcome(job, dropped=[f"margin {best:.3f} below {self.fb.min_margin:g}"])
        records = []
        for better, worse in chosen:
            record_id = job.record_id if self.fb.min_margin is None else pair_id(job.record_id, *sorted((better, worse)))
            records.append(self._record(w, record_id, better, worse, results, scores=self._scores(results)))
        return Outcome(job, records=records)

    @staticmethod
    def _scores(results: dict[tuple[int, int], dict]) -> dict[int, float]:
        """Each sample's mean probability of being preferred over the others it was compared to."""
        won: dict[int, list[float]] = {}
        for (i, j), entry in results.items():
            won.setdefault(i, []).append(entry["preference"])
            won.setdefault(j, []).append(1 - entry["preference"])
        return {i: sum(v) / len(v) for i, v in won.items()}

    def _best_worst(self, results: dict[tuple[int, int], dict]) -> tuple[int, int]:
        scores = self._scores(results)
        order = sorted(scores, key=lambda i: (-scores[i], i))
        return order[0], order[-1]

    def _record(self, w: _Prompt, record_id: str, better: int, worse: int, results, scores) -> dict:
        entry = results[(better, worse)] if (better, worse) in results else _flipped(results[(worse, better)])
        preference = entry["preference"]
        chosen, rejected = w.completions[better], w.completions[worse]
        item = w.job.prompt
        keep = self.base.reasoning == "keep"
        system = next((m["content"] for m in item.history[:1] if m["role"] == "system"), self.base.builder.system)
        # as `cai judge` orders them: the chosen answer shown as (B), then as (A)
        first_orders = [sum(o[k] for o in entry["orders"]) / len(entry["orders"]) for k in (1, 0)]
        label = round(self.feedback.clamp(preference), 6)
        feedback = {"model": self.feedback.model_name, "samples": [better, worse], "principles": entry["principles"],
                    "orders": entry["orders"], "agree": entry["agree"],
                    "agreement": round(sum(entry["agree"]) / len(entry["agree"]), 6),
                    "preference": preference, "label": label,
                    "scores": {str(i): round(s, 6) for i, s in sorted(scores.items())},
                    **({"cot": entry["cot"]} if self.fb.cot else {})}
        return {
            "id": record_id,
            "prompt": item.text,
            **({"history": list(item.history)} if item.history else {}),
            "chosen": chosen.text,
            "rejected": rejected.text,
            **({"reasoning": {"chosen": chosen.reasoning, "rejected": rejected.reasoning}} if keep else {}),
            "principle": entry["principles"][0],
            # what `cai judge` writes, so stats, curation and export read these pairs as judged ones
            "judge": {"model": self.feedback.model_name, "question": self.feedback.question(
                          self.constitution.principle(entry["principles"][0])),
                      "preference": preference, "orders": [round(p, 6) for p in first_orders],
                      "agree": orders_agree(first_orders), "label": label, "swapped": False},
            "meta": {
                **self.fingerprint(),
                **({"system": system} if system else {}),
                **({"prompt_truncated": True} if item.truncated else {}),
                "feedback": feedback,
                "finish_reasons": {"response": rejected.finish_reason, "revision": [chosen.finish_reason],
                                   "critique": []},
                "tokens": {"prompt": w.spent[0], "completion": w.spent[1]},
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "cai": __version__,
            },
        }


def _flipped(entry: dict) -> dict:
    """A comparison of (i, j) read as one of (j, i): every probability from the other side, each
    principle's orders still [the first answer as (A), as (B)]."""
    return {**entry, "preference": round(1 - entry["preference"], 6),
            "orders": [[round(1 - b, 6), round(1 - a, 6)] for a, b in entry["orders"]]}
