"""`cai preview` as a library: a few conversations (response, critiques, revisions) run one
after another on a model loaded once, each turn's text streamed as it is generated, then the
filters' verdict, the judge's preference (if asked for) and a word diff of the pair. It prints
nothing and writes no file: what happens goes to a `Watcher`'s methods, and `preview` returns
the conversations."""

from __future__ import annotations

import difflib
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from cai.errors import InputError, OptionError, UsageError

if TYPE_CHECKING:
    from cai.options import PreviewOptions

# An argument ending so, with no space in it, names a prompts file (a missing one is an error
# rather than a prompt); anything else that is no file is the prompt itself.
_FILE_LIKE = re.compile(r"^\S+\.(?:jsonl|ndjson|json|csv|tsv|txt|parquet|arrow|feather)(?:\.(?:gz|bz2|xz|zst))?$",
                        re.IGNORECASE)


@dataclass
class Turn:
    stage: str                      # "response", "critique 1", "revision 1", …
    principle: str | None           # None for the response
    text: str = ""                  # as streamed so far; once ended, the backend's whole text
    started: float = 0.0            # time.monotonic() when the turn could start
    first: float | None = None      # … when its first text came
    ended: float | None = None
    tokens: int = 0
    finish_reason: str | None = None

    def timings(self) -> dict:
        return {"first_token_s": _since(self.started, self.first), "seconds": _since(self.started, self.ended),
                "tokens": self.tokens}


@dataclass
class Conversation:
    id: str
    prompt: str
    principles: tuple[str, ...]     # the principle of each round
    number: int                     # 1-based place among the conversations of the preview
    total: int
    turns: list[Turn] = field(default_factory=list)
    record: dict | None = None      # the pipeline's record, raw
    chosen: str | None = None       # the revision as the filters clean it
    rejected: str | None = None     # the response as the filters clean it
    reasons: list[str] = field(default_factory=list)   # why the filters would drop the pair ([]: kept)
    cleaned: list[str] = field(default_factory=list)   # what the clean-up removed
    similarity: float | None = None
    judge: dict | None = None       # the judge's record field (preference, both orders)
    judge_error: str | None = None
    diff: list[tuple[str, str]] = field(default_factory=list)   # word_diff(rejected, chosen)

    def to_json(self, started: float, load_seconds: float | None) -> dict:
        """The conversation as one JSON object; `started`: the time.monotonic() its first token
        is counted from (the CLI's: when the process started), `load_seconds`: the model's load."""
        rounds = (self.record or {}).get("rounds", [])
        turns = [t for t in self.turns if t.ended is not None]
        first = next((t.first for t in turns if t.first is not None), None)
        return {
            "id": self.id, "prompt": self.prompt, "principles": list(self.principles),
            "response": (self.record or {}).get("rejected"),
            "critiques": [r["critique"] for r in rounds], "revisions": [r["revision"] for r in rounds],
            "chosen": self.chosen, "rejected": self.rejected,
            "verdict": {"kept": not self.reasons, "reasons": self.reasons, "cleaned": self.cleaned,
                        "similarity": None if self.similarity is None else round(self.similarity, 4)},
            "judge": self.judge, **({"judge_error": self.judge_error} if self.judge_error else {}),
            "finish_reasons": {t.stage: t.finish_reason for t in turns},
            "timings": {"model_load_s": _round(load_seconds), "first_token_s": _since(started, first),
                        "seconds": _since(turns[0].started if turns else None, turns[-1].ended if turns else None),
                        "turns": {t.stage: t.timings() for t in turns}},
        }


class Watcher:
    """What a preview tells as it goes. Each method does nothing here; override those you want."""

    def loading(self, model: str) -> None: ...

    def loaded(self, model: str, seconds: float) -> None: ...

    def begin(self, conversation: Conversation) -> None:
        """A conversation starts: its prompt and principles are known."""

    def turn_begin(self, conversation: Conversation, turn: Turn) -> None: ...

    def text(self, conversation: Conversation, turn: Turn) -> None:
        """`turn.text` changed (it is the whole text so far)."""

    def turn_end(self, conversation: Conversation, turn: Turn) -> None: ...

    def judging(self, conversation: Conversation) -> None:
        """The judge is about to score the pair (both orders)."""

    def end(self, conversation: Conversation) -> None:
        """Verdict, judge and diff are in."""


def word_diff(a: str, b: str) -> list[tuple[str, str]]:
    """(op, text) pieces that turn `a` into `b` word by word: op "equal", "delete" (a's words)
    or "insert" (b's words); each word keeps the whitespace before it, so joining the equal and
    inserted pieces gives `b` (leading and trailing whitespace aside)."""
    old, new = re.findall(r"\s*\S+", a), re.findall(r"\s*\S+", b)
    matcher = difflib.SequenceMatcher(None, [w.strip() for w in old], [w.strip() for w in new], autojunk=False)
    pieces: list[tuple[str, str]] = []
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            pieces.append(("equal", "".join(new[j1:j2])))
            continue
        if i2 > i1:
            pieces.append(("delete", "".join(old[i1:i2])))
        if j2 > j1:
            pieces.append(("insert", "".join(new[j1:j2])))
    return pieces


def preview(prompts: str, options: PreviewOptions, watcher: Watcher | None = None) -> tuple[list[Conversation], float | None]:
    """Run the conversations `prompts` (a prompt, or a prompts file and `limit` of its prompts)
    makes with `options`, telling `watcher` as they go. Returns them and the model's load time
    (None for a backend given open)."""
    from cai.backends.spec import is_open_backend, resolve
    from cai.run.session import RunSession, never
    from cai.constitution import load_constitution
    from cai.judging import Judge
    from cai.pipeline import Pipeline, RunConfig
    from cai.templates import load_templates
    from cai.run.generate import make_filters

    watcher = watcher or Watcher()
    options = replace(options, filter=True, repairs=0)      # the verdict is always shown; no retries
    options.check()
    constitution = load_constitution(options.constitution)
    known = [p.id for p in constitution.principles]
    for wanted in options.principle:
        if wanted not in known:
            raise OptionError("principle", f"unknown principle '{wanted}'; {constitution.name} has: {', '.join(known)}")
    templates = load_templates(options.templates)
    config = RunConfig(
        revisions=options.revisions or constitution.defaults.revisions,
        sampling=options.sampling or constitution.defaults.sampling, seed=options.seed, batch_size=1,
        few_shot=options.few_shot, reasoning=options.reasoning, reasoning_tags=options.tags(),
        params=_sampling(options))
    plans = _plans(_items(prompts, options), options, constitution, config)
    load = None
    with RunSession((), lock=False, stop=never) as session:         # Ctrl-C raises: nothing is written
        if is_open_backend(options.model):
            backend = session.backend(options)
        else:
            resolved = resolve(options.backend_spec())
            watcher.loading(resolved[1])
            began = time.monotonic()
            backend = session.backend(options, resolved)
            load = time.monotonic() - began
            watcher.loaded(resolved[1], load)
        pipeline = Pipeline(backend, constitution, templates, config)
        jobs = []
        for item, record_id, principles in plans:
            job, problem = pipeline.job(item, record_id, principles)
            if problem:
                raise UsageError(f"prompt {item.id}: {problem}")
            jobs.append(job)
        filters = make_filters(options, constitution, config)
        judge = Judge(backend, constitution, templates, options.judge_config()) if options.judge else None
        return _Run(watcher, jobs, config.revisions).go(pipeline, filters, judge), load

class _Run:
    """The conversations in flight one at a time, each turn's times and text as it streams."""

    def __init__(self, watcher: Watcher, jobs, revisions: int):
        self.watcher, self.jobs = watcher, jobs
        self.conversations = [Conversation(job.record_id, job.prompt.text, tuple(p.id for p in job.principles),
                                           number, len(jobs)) for number, job in enumerate(jobs, start=1)]
        self.by_id = {c.id: c for c in self.conversations}
        self.stages = ["response"] + [f"{kind} {n}" for n in range(1, revisions + 1) for kind in ("critique", "revision")]
        self.current: Conversation | None = None

    def go(self, pipeline, filters, judge) -> list[Conversation]:
        if not self.jobs:
            return []
        self._begin(self.conversations[0])
        for made in pipeline.run(self.jobs, on_turn=self._on_turn, on_text=self._on_text):
            for record in made:
                self._finish(self.by_id[record["id"]], record, filters, judge)
                after = self.conversations.index(self.by_id[record["id"]]) + 1
                if after < len(self.conversations):
                    self._begin(self.conversations[after])
        return self.conversations

    def _begin(self, conversation: Conversation) -> None:
        self.current = conversation
        self.watcher.begin(conversation)
        self._next_turn(conversation)

    def _next_turn(self, conversation: Conversation) -> None:
        stage = self.stages[len(conversation.turns)]
        round_no = (len(conversation.turns) + 1) // 2
        turn = Turn(stage, conversation.principles[round_no - 1] if round_no else None, started=time.monotonic())
        conversation.turns.append(turn)
        self.watcher.turn_begin(conversation, turn)

    def _on_text(self, record_id: str, stage: str, text: str) -> None:
        conversation = self.by_id[record_id]
        turn = conversation.turns[-1]
        if turn.stage != stage or text == turn.text:
            return
        if turn.first is None and text:
            turn.first = time.monotonic()
        turn.text = text
        self.watcher.text(conversation, turn)

    def _on_turn(self, stage: str, completion) -> None:
        conversation = self.current          # one conversation in flight at a time
        turn = conversation.turns[-1]
        turn.ended = time.monotonic()
        turn.tokens, turn.finish_reason = completion.completion_tokens, completion.finish_reason
        if turn.first is None and completion.text:
            turn.first = turn.ended
        self.watcher.turn_end(conversation, turn)
        if len(conversation.turns) < len(self.stages):
            self._next_turn(conversation)

    def _finish(self, conversation: Conversation, record: dict, filters, judge) -> None:
        conversation.record = record
        verdict = filters.apply(record)
        kept = verdict.record
        conversation.chosen, conversation.rejected = kept["chosen"], kept["rejected"]
        conversation.reasons, conversation.similarity = list(verdict.reasons), verdict.similarity
        conversation.cleaned = list(kept.get("meta", {}).get("cleaned", []))
        if judge is not None:
            self.watcher.judging(conversation)
            judged = {**kept}
            conversation.judge_error = judge.label([judged])[0]
            conversation.judge = judged.get("judge")
        conversation.diff = word_diff(conversation.rejected, conversation.chosen)
        self.watcher.end(conversation)


def _items(prompts: str, options: PreviewOptions) -> list:
    """The prompts: `limit` (default 1) of a file's, or the argument itself as the one prompt."""
    from cai.inputs import read_prompts
    from cai.messages import PromptItem, prompt_id

    if prompts == "-" or Path(prompts).is_file():
        return read_prompts(prompts, fields=options.fields(), split=options.split,
                            input_format=options.input_format)[:options.limit or 1]
    if _FILE_LIKE.match(prompts.strip()):
        raise InputError(prompts, "no such file (a prompt with no space that ends like a file name is taken for one)")
    for name, value, default in (("input_format", options.input_format, None),
                                 ("prompt_field", options.prompt_field, "prompt"),
                                 ("response_field", options.response_field, None)):
        if value != default:
            raise OptionError(name, "is for a prompts file or stdin, not a prompt given as the argument")
    if not prompts.strip():
        raise UsageError("the prompt is empty")
    return [PromptItem(prompt_id(prompts), prompts, line=1, index=0)]


def _plans(items: list, options: PreviewOptions, constitution, config) -> list[tuple]:
    """(prompt, record id, the principle of each round) of every conversation: one per principle
    named (`principle`) or of the constitution (`all`), every round with it; else the ones a
    generation run with these options would make (its own principle choice)."""
    from cai.pipeline import record_plans

    wanted = (constitution.principles if options.all
              else [constitution.principle(p) for p in dict.fromkeys(options.principle)])
    if wanted:
        return [(item, f"{item.id}/{p.id}", (p,) * config.revisions) for item in items for p in wanted]
    return [(item, record_id, principles) for item, records in record_plans(constitution, config, items)
            for record_id, principles in records]


def _sampling(options: PreviewOptions):
    from cai.backends.base import SamplingParams

    return SamplingParams(max_new_tokens=options.max_new_tokens, temperature=options.temperature, top_p=options.top_p)


def _since(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round(end - start, 4)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
