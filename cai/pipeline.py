"""The generate → critique → revise loop. Takes prompts, a constitution, templates and a backend;
yields finished records batch by batch. Knows nothing of the terminal or of files."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterable, Iterator

from cai import __version__
from cai.backends.base import Backend, Completion, SamplingParams
from cai.constitution import Constitution, Principle, plan_principles
from cai.io import PromptItem
from cai.prompts import ConversationBuilder, Message, Templates


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


@dataclass
class _Work:
    job: Job
    messages: list[Message]
    completions: list[Completion] = field(default_factory=list)


StageCallback = Callable[[str, int], None]


class Pipeline:
    def __init__(self, backend: Backend, constitution: Constitution, templates: Templates, config: RunConfig):
        self.backend = backend
        self.constitution = constitution
        self.templates = templates
        self.config = config
        self.builder = ConversationBuilder(constitution, templates, few_shot=config.few_shot)

    def plan(self, prompts: Iterable[PromptItem], skip: set[str] = frozenset()) -> list[Job]:
        """The records this run will make, minus those already done (`skip`, by record id)."""
        jobs = []
        for index, item in enumerate(prompts):
            plans = plan_principles(self.constitution, item.id, index, self.config.revisions,
                                    self.config.sampling, self.config.seed)
            for principles in plans:
                record_id = item.id if self.config.sampling != "all" else f"{item.id}/{principles[0].id}"
                if record_id not in skip:
                    jobs.append(Job(record_id, item, tuple(principles)))
        return jobs

    def run(self, jobs: list[Job], on_stage: StageCallback | None = None) -> Iterator[list[dict]]:
        """Yields the records of each batch as soon as the batch is done."""
        size = self.config.batch_size
        for start in range(0, len(jobs), size):
            yield self._run_batch(jobs[start:start + size], on_stage)

    def _run_batch(self, jobs: list[Job], on_stage: StageCallback | None) -> list[dict]:
        work = [_Work(job, self.builder.opening(job.prompt.text)) for job in jobs]
        self._step(work, "response", on_stage)
        for round_no in range(1, self.config.revisions + 1):
            for w in work:
                w.messages.append(self.builder.critique_request(w.job.principles[round_no - 1], round_no, w.job.prompt.text))
            self._step(work, f"critique {round_no}", on_stage)
            for w in work:
                w.messages.append(self.builder.revision_request(w.job.principles[round_no - 1], round_no, w.job.prompt.text))
            self._step(work, f"revision {round_no}", on_stage)
        return [self._record(w) for w in work]

    def _step(self, work: list[_Work], stage: str, on_stage: StageCallback | None) -> None:
        if on_stage:
            on_stage(stage, len(work))
        seed = _derive_seed(self.config.seed, stage, [w.job.record_id for w in work])
        completions = self.backend.generate([w.messages for w in work], self.config.params, seed=seed)
        for w, completion in zip(work, completions, strict=True):
            w.messages.append({"role": "assistant", "content": completion.text})
            w.completions.append(completion)

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
                "model": self.backend.model_name,
                "constitution": self.constitution.ref,
                "templates": self.templates.ref,
                "seed": self.config.seed,
                "params": {**self.config.params.to_dict(), "revisions": self.config.revisions,
                           "sampling": self.config.sampling, "few_shot": self.config.few_shot},
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


def _derive_seed(seed: int, stage: str, ids: list[str]) -> int:
    """A sampling seed for one generate call that depends on the run seed and on what is being
    generated, not on how many calls came before."""
    digest = hashlib.sha256(f"{seed}\x1f{stage}\x1f{chr(31).join(ids)}".encode()).digest()
    return int.from_bytes(digest[:4], "little")
