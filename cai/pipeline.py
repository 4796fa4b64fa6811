"""The generate → critique → revise loop. Takes prompts, a constitution, templates and a backend;
yields finished records batch by batch. Knows nothing of the terminal or of files."""

from __future__ import annotations

import functools

import hashlib
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Callable, Iterable, Iterator

from cai import __version__
from cai.backends.base import Backend, Completion, Request, SamplingParams, Stream, ThinkingSwitch
from cai.constitution import Constitution, Principle, plan_principles
from cai.errors import BackendError, ModelError, OptionError
from cai.messages import PromptItem
from cai.messages import Message
from cai.records import Record
from cai.templates import ConversationBuilder, Templates
from cai import reasoning as thinking
from cai.fingerprint import run_fingerprint


REPAIR_TEMPERATURE = 0.5    # a greedy run would repeat its failed turn word for word: repairs sample


@dataclass(frozen=True)
class RunConfig:
    revisions: int = 1
    sampling: str = "random"
    seed: int = 0
    batch_size: int = 8
    few_shot: bool = True
    params: SamplingParams = SamplingParams()
    reasoning: str = "auto"                              # cai.reasoning.MODES
    reasoning_tags: tuple[str, str] = thinking.DEFAULT_TAGS
    repairs: int = 0               # more tries of a turn whose pair the filters would drop (needs `check`)
    repair_temperature: float = REPAIR_TEMPERATURE       # what a greedy run samples its repairs at
    repair_from: str = "revision"  # what a repair of a finished pair samples anew: the revision, or the critique too
    filters: str = "on"            # what drops pairs ("on", "off", "on+refusal", …): the output's records depend on it
    # issue 33: sampled pairs (what the feedback compares: see cai.feedback), first-stage variants
    feedback: dict | None = None   # FeedbackConfig.describe() of a run with samples
    critique: bool = True          # False: each round revises directly against its principle
    keep_rounds: bool = False      # a pair per revision round, not only the last


TOO_LONG, REFUSED = "too long", "refused"      # why a prompt is left out before it starts


@dataclass(frozen=True)
class Unfit:
    """Why a record cannot be made with this model: its conversation is longer than the context
    (`too long`: no-few-shot or truncation can help) or the chat template refuses it (`refused`:
    the conversation's roles or order are not what the template takes)."""

    kind: str
    reason: str

    def __str__(self) -> str:
        return self.reason


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
    tries: dict[str, int] = field(default_factory=dict)      # stage → attempts made so far
    repairs: list[dict] = field(default_factory=list)        # each failed attempt: turn and reasons
    spent: list[int] = field(default_factory=lambda: [0, 0])  # prompt and completion tokens, every try


TurnCallback = Callable[[str, Completion], None]     # (stage, completion) as each turn ends
FailureCallback = Callable[[Job, str, str], None]   # (job, stage, reason) of a conversation that failed
StageTextCallback = Callable[[str, str, str], None]  # (record id, stage, text so far) as a turn is generated


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
        self.builder = ConversationBuilder(constitution, templates, few_shot=config.few_shot, critique=config.critique)
        self.per_round = 2 if config.critique else 1      # turns a round adds: critique and revision, or revision
        self._fixed_cache: dict[tuple[Principle, ...], int] = {}
        self._mentions: int | None = None
        self._empty_turn = 0
        switch = backend.thinking_switch if isinstance(backend, ThinkingSwitch) else None
        self.reasoning = thinking.resolve(config.reasoning, switch)
        if isinstance(backend, ThinkingSwitch):
            # off: the template's (or server's) switch; keep/drop: thinking on where there is a
            # switch, else the model's own default
            backend.set_thinking(False if self.reasoning == "off" else True if switch else None)

    def plan(self, prompts: Iterable[PromptItem], todo: Callable[[str], bool] | None = None,
             truncate_long: bool = False) -> tuple[list[Job], list[tuple[PromptItem, str, Unfit]]]:
        """The records this run will make, but those already made (`todo(record id)` false: the
        run decides, from what its output holds; None: none is), and the records left out as
        (prompt, record id, why): a conversation that cannot fit the model's context is skipped
        (or with `truncate_long` its prompt is cut to fit), and so is one the model's chat
        template refuses."""
        jobs: list[Job] = []
        left_out: list[tuple[PromptItem, str, Unfit]] = []
        for item, records in record_plans(self.constitution, self.config, prompts):
            for record_id, principles in records:
                if todo is not None and not todo(record_id):
                    continue
                job, problem = self.job(item, record_id, principles, truncate_long)
                if problem:
                    left_out.append((item, record_id, problem))
                    continue
                jobs.append(job)
        return jobs, left_out

    def job(self, item: PromptItem, record_id: str, principles: tuple[Principle, ...],
            truncate_long: bool = False) -> tuple[Job | None, Unfit | None]:
        """One record to make with these principles, or why it cannot be made (see `plan`)."""
        prompt, problem, tokens = self._fit(item, principles, truncate_long)
        return (None, problem) if problem else (Job(record_id, prompt, principles, tokens), None)

    def _fit(self, item: PromptItem, principles: tuple[Principle, ...],
             truncate: bool) -> tuple[PromptItem, Unfit | None, int | None]:
        """The prompt as it will be used, or why it cannot be, and the most tokens its whole
        conversation can hold: the opening, every request, and every turn at --max-new-tokens."""
        context = self.backend.context_length
        if not context:
            return item, None, None
        fixed = self._fixed_tokens(principles)
        if fixed >= context:        # no prompt fits: the turns' budget alone is past the context
            turns = 1 + self.per_round * len(principles)
            per_turn = self.config.params.max_new_tokens
            most = (context - (fixed - turns * per_turn)) // turns
            raise OptionError("max_new_tokens", f"{per_turn} new tokens for each of a conversation's {turns} turns "
                              f"need more than the model's context of {context} tokens"
                              + (f"; at most about {most} fit" if most > 0 else "; fewer revisions would fit"))
        if item.history or item.response is not None:
            try:
                fixed += self._extra_tokens(item)
            except Exception as exc:  # noqa: BLE001 -- the chat template refused this conversation
                return item, Unfit(REFUSED, f"the model's chat template refuses this conversation: "
                                           f"{_one_line(exc)}"), None
        room = context - fixed
        used = self._prompt_tokens(item.text)
        if used <= room:
            return item, None, fixed + used
        reason = Unfit(TOO_LONG, f"the whole conversation needs about {used + fixed} tokens, more than the "
                                 f"model's context of {context}")
        if not truncate or room < 16:
            return item, reason, None
        text = item.text
        while used > room:
            text = text[: max(1, int(len(text) * room / used * 0.95))]
            used = self._prompt_tokens(text)
        return replace(item, text=text, truncated=True), None, fixed + used

    def _extra_tokens(self, item: PromptItem) -> int:
        """Tokens of a conversation's earlier turns and of its given response, beyond those of the
        opening and of the prompt itself."""
        base = self.builder.opening("")
        whole = self.builder.opening("", item.history)
        if item.response is not None:
            whole = [*whole, {"role": "assistant", "content": item.response}]
            base = [*base, {"role": "assistant", "content": ""}]
        return max(0, self.backend.count_tokens(whole) - self.backend.count_tokens(base))

    def _fixed_tokens(self, principles: tuple[Principle, ...]) -> int:
        if principles not in self._fixed_cache:
            conversation = self.builder.opening("")
            for round_no, principle in enumerate(principles, start=1):
                if self.config.critique:
                    conversation += [{"role": "assistant", "content": ""},
                                     self.builder.critique_request(principle, round_no, "")]
                conversation += [{"role": "assistant", "content": ""},
                                 self.builder.revision_request(principle, round_no, "")]
            turns = 1 + self.per_round * len(principles)
            try:
                counted = self.backend.count_tokens(conversation)
            except Exception as exc:  # noqa: BLE001 -- the chat template refuses every conversation of this run
                raise ModelError(f"{self.backend.model_name}: its chat template refuses the conversations this run "
                                 f"makes ({', '.join(m['role'] for m in conversation[:4])}, …): {_one_line(exc)}"
                                 + ("; a templates folder whose system.jinja is empty sends no system turn"
                                    if conversation[0]["role"] == "system" else "")) from None
            self._fixed_cache[principles] = counted + turns * self.config.params.max_new_tokens + 8
        return self._fixed_cache[principles]

    def _prompt_tokens(self, text: str) -> int:
        """Tokens a prompt adds to a whole conversation: once in the user turn, and again in every
        request whose template quotes the prompt."""
        if self._mentions is None:
            sentinel = "\x1fcai-prompt\x1f"
            p = self.constitution.principles[0]
            requests = [self.builder.revision_request(p, 1, sentinel)]
            if self.config.critique:
                requests.append(self.builder.critique_request(p, 1, sentinel))
            quoted = sum(sentinel in m["content"] for m in requests)
            self._mentions = 1 + self.config.revisions * quoted
            self._empty_turn = self.backend.count_tokens([self.builder.user_prompt("")])
        added = self.backend.count_tokens([self.builder.user_prompt(text)]) - self._empty_turn
        return added * self._mentions

    def run(self, jobs: list[Job], on_turn: TurnCallback | None = None,
            stop: Callable[[], bool] | None = None, on_failure: FailureCallback | None = None,
            check: Callable[[Record], list[str]] | None = None,
            on_text: StageTextCallback | None = None) -> Iterator[list[Record]]:
        """Yields records as their conversations finish. Up to `batch_size` conversations are in
        flight at once, each moving through its turns on its own (a finished response goes
        straight on to its critique); a new prompt starts as soon as one finishes. Once `stop()`
        is true no new prompt starts, and the run ends when those in flight are done. A turn the
        backend could not produce (a remote request that failed after its retries) ends its
        conversation without a record and goes to `on_failure`; without one, it raises.

        With `check` (the reasons the filters would drop a record for) and `config.repairs`, a
        conversation whose pair would be dropped tries its failing turn again before it is
        given up (see `_repair`); the record says every failed attempt in `meta.repairs`.

        `on_text(record id, stage, text so far)` shows each turn as it is generated (the
        backend's streamed text: see cai.backends.base.Stream); the records are the same."""
        longest = max((j.tokens or 0 for j in jobs), default=0) or None
        work: dict[str, _Work] = {}
        shown = {} if on_text is None else {
            "on_text": lambda key, text: on_text(key, self._stage(len(work[key].completions)), text)}
        stream = self.backend.stream(self.config.params, max(1, min(self.config.batch_size, len(jobs))), longest,
                                     **shown)
        waiting = deque(jobs)
        turns = 1 + self.per_round * self.config.revisions
        check = check if self.config.repairs else None
        while True:
            while waiting and len(work) < self.config.batch_size and not (stop and stop()):
                job = waiting.popleft()
                w = work[job.record_id] = _Work(job, self.builder.opening(job.prompt.text, job.prompt.history))
                if job.prompt.response is not None:
                    self._add_turn(w, Completion(job.prompt.response, "given", 0, 0))
                    self._next_request(w)
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
                    stage = self._stage(len(w.completions))
                    if on_failure is None:
                        raise BackendError(f"{w.job.record_id}: {stage}: {completion.error}")
                    on_failure(w.job, stage, completion.error)
                    continue
                self._add_turn(w, completion)
                if on_turn:
                    on_turn(self._stage(len(w.completions) - 1), completion)
                record = self._record(w) if len(w.completions) == turns else None
                if check and self._repair(w, check, record):
                    self._submit(stream, w)
                    continue
                if record is not None:
                    done.append(record)
                    stream.release(key)
                    del work[key]
                    continue
                self._next_request(w)
                self._submit(stream, w)
            if done:
                yield done

    def _repair(self, w: _Work, check: Callable[[Record], list[str]], record: Record | None) -> bool:
        """Whether the turn that just ended is taken back to be tried again (its request is then
        the conversation's last message). A response cut at --max-new-tokens is retried at once
        (a truncated original is dropped whatever the revision says); a finished pair the checks
        would drop gets a fresh sample of its last revision (`repair_from` "critique": of its last
        critique and revision). Each try has its own seed, derived
        like every turn's, so a resumed run makes the same record. `record`: the finished pair, or
        None while turns remain."""
        if len(w.repairs) >= self.config.repairs:
            return False
        ended = len(w.completions) - 1
        if ended == 0 and w.completions[0].finish_reason == "length":
            reasons = ["truncated"]
        elif record is not None:
            reasons = check(record)
            if not reasons:
                return False
        else:
            return False
        taken = [w.completions.pop()]
        w.messages.pop()
        if ended and self.config.repair_from == "critique" and self.config.critique:
            taken.append(w.completions.pop())   # the critique too, and the revision request after it
            del w.messages[-2:]
        w.repairs.append({"turn": self._stage(ended), "reasons": reasons,
                          "tokens": sum(c.completion_tokens for c in taken)})
        return True

    def _add_turn(self, w: _Work, completion: Completion) -> None:
        """A finished turn joins the conversation without its reasoning (kept on the completion)."""
        part = thinking.split(completion.text, completion.reasoning, self.config.reasoning_tags)
        completion = replace(completion, text=part.answer, reasoning=part.reasoning,
                             finish_reason="length" if part.unfinished else completion.finish_reason)
        w.messages.append({"role": "assistant", "content": completion.text})
        w.completions.append(completion)
        w.spent[0] += completion.prompt_tokens
        w.spent[1] += completion.completion_tokens

    def _stage(self, turn: int) -> str:
        """The name of a turn: the response, then each round's critique and revision (without
        critiques, each round's revision)."""
        return _stage(turn) if self.config.critique else ("response" if turn == 0 else f"revision {turn}")

    def _next_request(self, w: _Work) -> None:
        if not self.config.critique:
            round_no = len(w.completions)
            principle = w.job.principles[round_no - 1]
            w.messages.append(self.builder.revision_request(principle, round_no, w.job.prompt.text))
            return
        round_no = (len(w.completions) + 1) // 2
        principle, prompt = w.job.principles[round_no - 1], w.job.prompt.text
        w.messages.append(self.builder.critique_request(principle, round_no, prompt)
                          if len(w.completions) % 2 else self.builder.revision_request(principle, round_no, prompt))

    def _submit(self, stream: Stream, w: _Work) -> None:
        stage = self._stage(len(w.completions))
        tries = w.tries[stage] = w.tries.get(stage, 0) + 1
        # a retry gets its own seed (the first try's is what it always was), and a greedy run
        # samples its retries, or it would write the same turn again
        key = stage if tries == 1 else f"{stage}#{tries}"
        params = None
        if tries > 1 and self.config.params.greedy:
            params = replace(self.config.params, temperature=self.config.repair_temperature)
        stream.submit(Request(w.job.record_id, list(w.messages), _derive_seed(self.config.seed, key, w.job.record_id),
                              params=params))

    def fingerprint(self) -> dict:
        return run_fingerprint(self.backend.model_name, self.constitution, self.templates, self.config)

    @functools.cached_property
    def config_hash(self) -> str:
        """A short hash of the fingerprint: what decides the records (cai.runconfig.config_hash)."""
        from cai.runconfig import config_hash

        return config_hash(self.fingerprint())

    def _record(self, w: _Work) -> Record:
        response, *turns = w.completions
        keep = self.reasoning == "keep"
        rounds = []
        for i, principle in enumerate(w.job.principles):
            if self.config.critique:
                critique, revision = turns[2 * i], turns[2 * i + 1]
            else:
                critique, revision = None, turns[i]
            rounds.append({"principle": principle.id, "critique": critique.text if critique else None,
                           "revision": revision.text,
                           **({"reasoning": {"critique": critique.reasoning if critique else None,
                                             "revision": revision.reasoning}} if keep else {})})
        last = rounds[-1]
        item = w.job.prompt
        system = next((m["content"] for m in item.history[:1] if m["role"] == "system"), self.builder.system)
        return {
            "id": w.job.record_id,
            "prompt": item.text,
            **({"history": list(item.history)} if item.history else {}),
            "chosen": last["revision"],
            "rejected": response.text,
            **({"reasoning": response.reasoning} if keep else {}),
            "principle": last["principle"],
            "critique": last["critique"],
            "rounds": rounds,
            "meta": {
                **self.fingerprint(),
                "config": self.config_hash,
                **({"system": system} if system else {}),
                **({"prompt_truncated": True} if item.truncated else {}),
                **({"given_response": True} if item.response is not None else {}),
                **({"attempts": dict(w.tries), "repairs": list(w.repairs)} if self.config.repairs else {}),
                **({"repair_temperature": self.config.repair_temperature}
                   if w.repairs and self.config.params.greedy else {}),
                **({"reasoning": self.reasoning} if self.reasoning != "drop" or self.config.reasoning != "auto" else {}),
                "finish_reasons": {
                    "response": response.finish_reason,
                    "critique": [turns[2 * i].finish_reason for i in range(len(rounds))] if self.config.critique
                    else [],
                    "revision": [turns[self.per_round * i + self.per_round - 1].finish_reason
                                 for i in range(len(rounds))],
                },
                "tokens": {"prompt": w.spent[0], "completion": w.spent[1]},     # failed tries included
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "cai": __version__,
            },
        }


def round_pairs(record: dict) -> list[dict]:
    """`keep_rounds`: a pair for each round before the last, its revision (chosen) against the
    answer it revised (rejected: the response, or the round before's revision), with the id
    `ID#rK`. The record itself stays the final pair (the last revision against the response)."""
    rounds, pairs = record.get("rounds") or [], []
    for k in range(1, len(rounds)):
        this = rounds[k - 1]
        before = record["rejected"] if k == 1 else rounds[k - 2]["revision"]
        pairs.append({**record, "id": f"{record['id']}#r{k}", "chosen": this["revision"], "rejected": before,
                      "principle": this["principle"], "critique": this["critique"], "rounds": rounds[:k],
                      "meta": {**record["meta"], "round": k, "finish_reasons": {
                          **record["meta"]["finish_reasons"],
                          "revision": record["meta"]["finish_reasons"]["revision"][:k]}}})
    return pairs


def _stage(turn: int) -> str:
    """Turn 0 is the response; then critique 1, revision 1, critique 2, …"""
    return "response" if turn == 0 else f"{'critique' if turn % 2 else 'revision'} {(turn + 1) // 2}"


def _derive_seed(seed: int, stage: str, record_id: str) -> int:
    """The sampling seed of one turn: it depends on the run seed and on the record and turn being
    generated, not on what else is in flight or how many turns came before."""
    digest = hashlib.sha256(f"{seed}\x1f{stage}\x1f{record_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
