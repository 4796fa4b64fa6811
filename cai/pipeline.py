"""The generate → critique → revise loop. Takes prompts, a constitution, templates and a backend;
yields finished records batch by batch. Knows nothing of the terminal or of files."""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterable, Iterator

from cai import __version__
from cai.backends.base import Backend, Completion, Request, SamplingParams, Stream
from cai.constitution import Constitution, Principle, plan_principles
from cai.errors import BackendError
from cai.messages import PromptItem
from cai.messages import Message
from cai.prompts import ConversationBuilder, Templates


@dataclass(frozen=True)
class RunConfig:
    revisions: int = 1
    sampling: str = "random"
    seed: int = 0
    batch_size: int = 8
    few_shot: bool = True
    params: SamplingParams = SamplingParams()


@dataclass(frozen=True)
class Job:
    """One record to make: a prompt and the principle of each critique/revise round."""

    record_id: str
    prompt: PromptItem
    principles: tuple[Principle, ...]
    tokens: int | None = None       # most tokens the whole conversation can hold (None: not known)


@dataclass
class _Work:
    job: Job
    messages: list[Message]
    completions: list[Completion] = field(default_factory=list)


TurnCallback = Callable[[str, Completion], None]     # (stage, completion) as each turn ends
FailureCallback = Callable[[Job, str, str], None]   # (job, stage, reason) of a conversation that failed


def record_plans(constitution: Constitution, config: RunConfig, prompts: Iterable[PromptItem]
                 ) -> Iterator[tuple[PromptItem, list[tuple[str, tuple[Principle, ...]]]]]:
    """Each prompt with the records it makes: (record id, the principle of each round). Needs no
    model, so a finished run can be known as finished before one is loaded. Round-robin sampling
    counts by the prompt's place in the whole input (`PromptItem.index`), so a limit, a shard or
    a skipped line never changes which principle a prompt gets."""
    for position, item in enumerate(prompts):
        index = item.index if item.index is not None else position
        plans = plan_principles(constitution, item.id, index, config.revisions, config.sampling, config.seed)
        yield item, [(item.id if config.sampling != "all" else f"{item.id}/{principles[0].id}", tuple(principles))
                     for principles in plans]


def record_ids(constitution: Constitution, config: RunConfig, item: PromptItem) -> list[str]:
    """The ids of the records one prompt makes, as record_plans names them, without drawing
    their principles: the prompt's id, or with sampling 'all' one id per principle."""
    if config.sampling != "all":
        return [item.id]
    return [f"{item.id}/{principle.id}" for principle in constitution.principles]


class Pipeline:
    def __init__(self, backend: Backend, constitution: Constitution, templates: Templates, config: RunConfig):
        self.backend = backend
        self.constitution = constitution
        self.templates = templates
        self.config = config
        self.builder = ConversationBuilder(constitution, templates, few_shot=config.few_shot)
        self._fixed_cache: dict[tuple[Principle, ...], int] = {}
        self._mentions: int | None = None
        self._empty_turn = 0

    def plan(self, prompts: Iterable[PromptItem], skip: set[str] = frozenset(),
             truncate_long: bool = False) -> tuple[list[Job], list[tuple[PromptItem, str, str]]]:
        """The records this run will make, minus those already done (`skip`, by record id), and
        the records left out as (prompt, record id, reason): a conversation that cannot fit the
        model's context is skipped, or with `truncate_long` its prompt is cut to fit."""
        jobs: list[Job] = []
        left_out: list[tuple[PromptItem, str, str]] = []
        for item, records in record_plans(self.constitution, self.config, prompts):
            for record_id, principles in records:
                if record_id in skip:
                    continue
                prompt, problem, tokens = self._fit(item, principles, truncate_long)
                if problem:
                    left_out.append((item, record_id, problem))
                    continue
                jobs.append(Job(record_id, prompt, principles, tokens))
        return jobs, left_out

    def _fit(self, item: PromptItem, principles: tuple[Principle, ...],
             truncate: bool) -> tuple[PromptItem, str | None, int | None]:
        """The prompt as it will be used, or why it cannot be, and the most tokens its whole
        conversation can hold: the opening, every request, and every turn at --max-new-tokens."""
        context = self.backend.context_length
        if not context:
            return item, None, None
        fixed = self._fixed_tokens(principles)
        room = context - fixed
        used = self._prompt_tokens(item.text)
        if used <= room:
            return item, None, fixed + used
        reason = (f"the whole conversation needs about {used + fixed} tokens, more than the model's "
                  f"context of {context}")
        if not truncate or room < 16:
            return item, reason, None
        text = item.text
        while used > room:
            text = text[: max(1, int(len(text) * room / used * 0.95))]
            used = self._prompt_tokens(text)
        return PromptItem(item.id, text, item.line, truncated=True, index=item.index), None, fixed + used

    def _fixed_tokens(self, principles: tuple[Principle, ...]) -> int:
        if principles not in self._fixed_cache:
            conversation = self.builder.opening("")
            for round_no, principle in enumerate(principles, start=1):
                conversation += [{"role": "assistant", "content": ""},
                                 self.builder.critique_request(principle, round_no, ""),
                                 {"role": "assistant", "content": ""},
                                 self.builder.revision_request(principle, round_no, "")]
            turns = 1 + 2 * len(principles)
            self._fixed_cache[principles] = (self.backend.count_tokens(conversation)
                                             + turns * self.config.params.max_new_tokens + 8)
        return self._fixed_cache[principles]

    def _prompt_tokens(self, text: str) -> int:
        """Tokens a prompt adds to a whole conversation: once in the user turn, and again in every
        request whose template quotes the prompt."""
        if self._mentions is None:
            sentinel = "\x1fcai-prompt\x1f"
            p = self.constitution.principles[0]
            quoted = sum(sentinel in m["content"] for m in (self.builder.critique_request(p, 1, sentinel),
                                                           self.builder.revision_request(p, 1, sentinel)))
            self._mentions = 1 + self.config.revisions * quoted
            self._empty_turn = self.backend.count_tokens([self.builder.user_prompt("")])
        added = self.backend.count_tokens([self.builder.user_prompt(text)]) - self._empty_turn
        return added * self._mentions

    def run(self, jobs: list[Job], on_turn: TurnCallback | None = None,
            stop: Callable[[], bool] | None = None, on_failure: FailureCallback | None = None) -> Iterator[list[dict]]:
        """Yields records as their conversations finish. Up to `batch_size` conversations are in
        flight at once, each moving through its turns on its own (a finished response goes
        straight on to its critique); a new prompt starts as soon as one finishes. Once `stop()`
        is true no new prompt starts, and the run ends when those in flight are done. A turn the
        backend could not produce (a remote request that failed after its retries) ends its
        conversation without a record and goes to `on_failure`; without one, it raises."""
        longest = max((j.tokens or 0 for j in jobs), default=0) or None
        stream = self.backend.stream(self.config.params, max(1, min(self.config.batch_size, len(jobs))), longest)
        waiting = deque(jobs)
        work: dict[str, _Work] = {}
        turns = 1 + 2 * self.config.revisions
        while True:
            while waiting and len(work) < self.config.batch_size and not (stop and stop()):
                job = waiting.popleft()
                w = work[job.record_id] = _Work(job, self.builder.opening(job.prompt.text))
                self._submit(stream, w)
            if not work:
                return
            finished = stream.poll()
            if not finished:
                raise RuntimeError(f"backend stream returned nothing with {len(work)} conversations in flight")
            done = []
            for key, completion in finished:
                w = work[key]
                if completion.error is not None:
                    stream.release(key)
                    del work[key]
                    stage = _stage(len(w.completions))
                    if on_failure is None:
                        raise BackendError(f"{w.job.record_id}: {stage}: {completion.error}")
                    on_failure(w.job, stage, completion.error)
                    continue
                w.messages.append({"role": "assistant", "content": completion.text})
                w.completions.append(completion)
                if on_turn:
                    on_turn(_stage(len(w.completions) - 1), completion)
                if len(w.completions) == turns:
                    done.append(self._record(w))
                    stream.release(key)
                    del work[key]
                    continue
                round_no = (len(w.completions) + 1) // 2
                principle, prompt = w.job.principles[round_no - 1], w.job.prompt.text
                w.messages.append(self.builder.critique_request(principle, round_no, prompt)
                                  if len(w.completions) % 2 else self.builder.revision_request(principle, round_no, prompt))
                self._submit(stream, w)
            if done:
                yield done

    def _submit(self, stream: Stream, w: _Work) -> None:
        stage = _stage(len(w.completions))
        stream.submit(Request(w.job.record_id, list(w.messages), _derive_seed(self.config.seed, stage, w.job.record_id)))

    def fingerprint(self) -> dict:
        return run_fingerprint(self.backend.model_name, self.constitution, self.templates, self.config)

    def _record(self, w: _Work) -> dict:
        response, *turns = w.completions
        rounds = []
        for i, principle in enumerate(w.job.principles):
            critique, revision = turns[2 * i], turns[2 * i + 1]
            rounds.append({"principle": principle.id, "critique": critique.text, "revision": revision.text})
        last = rounds[-1]
        return {
            "id": w.job.record_id,
            "prompt": w.job.prompt.text,
            "chosen": last["revision"],
            "rejected": response.text,
            "principle": last["principle"],
            "critique": last["critique"],
            "rounds": rounds,
            "meta": {
                **self.fingerprint(),
                **({"system": self.builder.system} if self.builder.system else {}),
                **({"prompt_truncated": True} if w.job.prompt.truncated else {}),
                "finish_reasons": {
                    "response": response.finish_reason,
                    "critique": [turns[2 * i].finish_reason for i in range(len(rounds))],
                    "revision": [turns[2 * i + 1].finish_reason for i in range(len(rounds))],
                },
                "tokens": {"prompt": sum(c.prompt_tokens for c in w.completions),
                           "completion": sum(c.completion_tokens for c in w.completions)},
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "cai": __version__,
            },
        }


FINGERPRINT_KEYS = ("model", "constitution", "templates", "seed", "params")


def run_fingerprint(model_name: str, constitution: Constitution, templates: Templates, config: RunConfig) -> dict:
    """What makes two runs the same run: records may only be appended to a file whose records
    carry the same fingerprint (it is part of every record's meta, under FINGERPRINT_KEYS)."""
    params = {**config.params.to_dict(), "revisions": config.revisions, "sampling": config.sampling,
              "few_shot": config.few_shot}
    return dict(zip(FINGERPRINT_KEYS, (model_name, constitution.ref, templates.ref, config.seed, params), strict=True))


def fingerprint_differences(record: dict, fingerprint: dict) -> list[str]:
    """How the run that wrote `record` differs from `fingerprint` ('model: a → b', …)."""
    meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
    found = []
    for key, value in fingerprint.items():
        if key == "params":
            old = meta.get("params") if isinstance(meta.get("params"), dict) else {}
            found += [f"{k}: {old.get(k)!r} → {v!r}" for k, v in value.items() if old.get(k) != v]
        elif meta.get(key) != value:
            found.append(f"{key}: {meta.get(key)!r} → {value!r}")
    return found


def _stage(turn: int) -> str:
    """Turn 0 is the response; then critique 1, revision 1, critique 2, …"""
    return "response" if turn == 0 else f"{'critique' if turn % 2 else 'revision'} {(turn + 1) // 2}"


def _derive_seed(seed: int, stage: str, record_id: str) -> int:
    """The sampling seed of one turn: it depends on the run seed and on the record and turn being
    generated, not on what else is in flight or how many turns came before."""
    digest = hashlib.sha256(f"{seed}\x1f{stage}\x1f{record_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")
