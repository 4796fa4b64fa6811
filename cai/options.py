"""Options of a run as typed objects, one field per command-line flag (its long name in snake
case: `--max-new-tokens` is `max_new_tokens`, `--no-filter` is `filter=False`). The CLI and the
Python API fill the same objects; `check()` validates every value before any input is read and
raises OptionError naming the option.

Types are checked first, once for every field, from the fields' annotations (`check_types`): a
Python caller's `max_new_tokens="8"` is an OptionError naming the option and the type expected,
never a TypeError from deep inside a run. Nothing is coerced that could hide a mistake (no
numeric strings, no bools for numbers); what is harmless is normalised (a path-like object for a
string, an integer for a float, numpy scalars, a list for a tuple). The Python API's own
arguments go through the same rules (`check_arguments`)."""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import os
import types
import typing
from pathlib import Path
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any, Optional, Union

from cai.backends import registry
from cai.constitution import SAMPLING_MODES, Constitution
from cai.constitution.sampling import MAX_REVISIONS
from cai.declare import check_choices, option
from cai.errors import OptionError
from cai.inputs import INPUT_FORMATS
from cai.reasoning import MODES as REASONING_MODES
from cai.records import FORMATS


# ---- types, from the annotations -------------------------------------------------------------

class _Mismatch(Exception):
    pass


def _conform(value, hint):
    """`value` as `hint` takes it (normalised: see the module's docstring); _Mismatch if it is not one."""
    if hint is Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _conform(value, arg)
            except _Mismatch:
                pass
        raise _Mismatch
    if hint is type(None):
        if value is None:
            return None
        raise _Mismatch
    if hint is bool:
        if _is_bool(value):
            return bool(value)
        raise _Mismatch
    if hint is int:
        if isinstance(value, numbers.Integral) and not _is_bool(value):
            return int(value)
        raise _Mismatch
    if hint is float:
        if isinstance(value, numbers.Real) and not _is_bool(value):
            try:
                number = float(value)
            except OverflowError:           # an integer past the largest float
                raise _Mismatch from None
            if not math.isnan(number):
                return number
        raise _Mismatch
    if hint is str:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if isinstance(value, str):
            return value
        raise _Mismatch
    if origin is tuple or origin is list:
        if not isinstance(value, (tuple, list)):
            raise _Mismatch
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _Mismatch
            return tuple(_conform(v, a) for v, a in zip(value, args))
        items = [_conform(v, args[0]) for v in value] if args else list(value)
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if isinstance(value, dict):
            return value
        raise _Mismatch
    if origin is not None and origin in (Iterable, Callable) or hint in (Iterable, Callable):
        base = origin or hint
        if (callable(value) if base is Callable else isinstance(value, Iterable)):
            return value
        raise _Mismatch
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise _Mismatch
    return value                                    # an annotation this does not know: not checked


def _is_bool(value) -> bool:
    """A bool, numpy's included (never taken for a number, nor a number for one)."""
    kind = type(value)
    return isinstance(value, bool) or (kind.__module__ == "numpy" and kind.__name__ in ("bool_", "bool"))


def _describe(hint) -> str:
    """What `hint` asks for, in words: 'an integer', 'a string or None'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        words = [_describe(a) for a in args if a is not type(None)] + (["None"] if type(None) in args else [])
        return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0]
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        kinds = {_describe(a) for a in args}
        return f"a pair of {_plural(kinds.pop())}" if len(args) == 2 and len(kinds) == 1 else f"a tuple of {len(args)}"
    if origin in (tuple, list):
        return f"a list of {_plural(_describe(args[0]))}" if args else "a list"
    names = {bool: "True or False", int: "an integer", float: "a number", str: "a string", dict: "a dict",
             Iterable: "an iterable", Callable: "a function"}
    if (origin or hint) in names:
        return names[origin or hint]
    return f"a {getattr(hint, '__name__', str(hint))}"


def _plural(words: str) -> str:
    plain = words.split(" ", 1)[1] if words.startswith(("a ", "an ")) else words
    return {"True or False": "booleans"}.get(words, plain + "s")


def _got(value) -> str:
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:39] + "…"
    return f"{type(value).__name__} {shown}"


def conform(name: str, value, hint):
    """`value` of the option `name`, checked against the annotation `hint` and normalised; an
    OptionError naming the option and the type it takes if it is not one."""
    try:
        return _conform(value, hint)
    except _Mismatch:
        if isinstance(value, float) and math.isnan(value):
            raise OptionError(name, f"expected {_describe(hint)}, got NaN (not a number)") from None
        raise OptionError(name, f"expected {_describe(hint)}, got {_got(value)}") from None


@functools.cache
def _hints(owner) -> dict[str, Any]:
    return typing.get_type_hints(owner)


def check_types(options) -> None:
    """Every field of an options dataclass against its annotation, normalised in place."""
    hints = _hints(type(options))
    for f in fields(options):
        value = getattr(options, f.name)
        normal = conform(f.name, value, hints[f.name])
        if normal is not value:
            setattr(options, f.name, normal)


def check_arguments(function, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The arguments of a call to `function` (a Python API entry point), each checked against
    its annotation as `check_types` checks options; an unknown keyword is an OptionError with a
    did-you-mean. `**options` are left to the options dataclass they fill."""
    import difflib

    signature = inspect.signature(function)
    params = signature.parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        for name in kwargs:
            if name not in params:
                close = difflib.get_close_matches(name, list(params), n=1)
                raise OptionError(name, "unknown option" + (f"; did you mean `{close[0]}`?" if close else ""))
    bound = signature.bind(*args, **kwargs)
    hints = _hints(function)
    for name, value in bound.arguments.items():
        if params[name].kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
            continue
        if name in hints and not (value is None and params[name].default is None):
            bound.arguments[name] = conform(name, value, hints[name])
    return bound.args, bound.kwargs


def _at_least(name: str, value, low) -> None:
    if value is not None and value < low:
        raise OptionError(name, f"must be at least {low} (got {value})")


@dataclass
class _Model:
    """Which backend, and which model it runs."""

    backend: str = option("hf", "--backend", choices=registry.names(), panel="Model", help=registry.described())
    model: Any = option(None, "--model", "-m", cli=Optional[str], panel="Model", help=(
        "Model: a local folder, a .gguf file or a Hub id. Default: the embedded SmolLM2-135M-Instruct."))
    # (Python API) `model` may also be a backend already open


@dataclass
class BackendSpec(*reversed(registry.settings().values()), _Model):
    """Which model, and how to reach it: `backend` (a name in cai/backends/registry.py) and the
    options each backend declares (its `Settings`). `cai.backends.spec.open_backend` opens one."""

    def check(self) -> None:
        check_types(self)
        check_choices(self)
        if isinstance(self.model, os.PathLike):
            self.model = os.fspath(self.model)
        if self.model is not None and not isinstance(self.model, str) and not hasattr(self.model, "stream"):
            raise OptionError("model", f"expected a model name or path, or an open backend (got {type(self.model).__name__})")
        if not isinstance(self.model, (str, type(None))):
            return                       # an open backend: nothing else here applies
        defaults = {f.name: f.default for f in fields(BackendSpec)}
        for name, owners in registry.owners().items():
            if self.backend not in owners and getattr(self, name) != defaults[name]:
                raise OptionError(name, f"is for `backend` {' or '.join(owners)}")
        registry.backend_class(self.backend).check_settings(self)

    def backend_spec(self) -> BackendSpec:
        return BackendSpec(**{f.name: getattr(self, f.name) for f in fields(BackendSpec)})


@dataclass
class CurationOptions:
    """What to keep: filters, then the judge."""

    filter: bool = option(True, "--filter/--no-filter", panel="Curation", help=(
        "Clean revisions (preambles, role labels, next-turn debris) and drop pairs not worth training on: empty, "
        "unchanged, truncated, meta-talk, copied, repetitive. Counted by reason in the summary."))
    similarity: float = option(0.9, "--similarity", metavar="S", panel="Curation", help=(
        "Drop a pair as unchanged when its revision is at least this similar to the original (0-1, over words)."))
    repairs: int = option(3, "--repairs", metavar="N", panel="Curation", help=(
        "Tries again, up to N times a pair, a turn whose pair the filters would drop: a fresh sample of the revision "
        "(a response cut at --max-new-tokens is resampled at once); 0 turns it off. Each try has its own seed, so a "
        "resumed run makes the same records; a greedy run samples its repairs at temperature 0.5."))
    repair_from: str = option("revision", "--repair-from", choices=("revision", "critique"), panel="Curation", help=(
        "What a repair samples anew: the revision, or the critique and the revision."))
    drop_refusals: bool = option(False, "--drop-refusals", panel="Curation", help=(
        "Also drop pairs whose revision refuses (for constitutions that must not teach refusing)."))
    keep_filtered: bool = option(False, "--keep-filtered", panel="Curation", help=(
        "Write dropped pairs whole, with their reasons, to the filtered file (without it: their ids and reasons only)."))
    filtered: str | None = option(None, "--filtered", panel="Curation", help=(
        "JSONL file of dropped pairs and their reasons [default: OUTPUT.filtered.jsonl]; a rerun skips the ids it "
        "holds."))
    judge: bool = option(False, "--judge", panel="Judge", help=(
        "Label each kept pair with the model's own AI-feedback preference (see `cai judge`)."))
    min_preference: float | None = option(None, "--min-preference", metavar="P", panel="Judge", help=(
        "Keep only pairs whose chosen side the judge prefers with probability at least P (0-1); the others go to the "
        "filtered file."))
    swap: bool = option(False, "--swap", panel="Judge", help=(
        "Where the judge prefers the original response, write it as chosen and the revision as rejected."))
    clamp: str | tuple[float, float] | None = option(None, "--clamp", metavar="LO,HI", cli=Optional[str], panel="Judge", help=(
        "Soft labels: clamp judge.label into [LO, HI], e.g. 0.4,0.6 as in RL-CAI."))
    trust_disagreeing: bool = option(False, "--trust-disagreeing", panel="Judge", help=(
        "With --min-preference: take the judge's averaged preference even where its two orders disagree (one prefers "
        "the revision, the other the original); by default such a pair counts as a tie, 0.5."))

    def check(self, judging: bool) -> None:
        if not 0 < self.similarity <= 1:
            raise OptionError("similarity", f"must be greater than 0 and at most 1 (got {self.similarity:g})")
        if not judging and (self.min_preference is not None or self.swap or self.clamp or self.trust_disagreeing):
            raise OptionError("judge", "is needed by `min_preference`, `swap`, `clamp` and `trust_disagreeing`")
        if self.trust_disagreeing and self.min_preference is None:
            raise OptionError("trust_disagreeing", "only changes what `min_preference` drops; give one")
        if self.min_preference is not None and not 0 <= self.min_preference <= 1:
            raise OptionError("min_preference", f"must be between 0 and 1 (got {self.min_preference:g})")
        self.clamp_bounds()

    def clamp_bounds(self) -> tuple[float, float] | None:
        if self.clamp is None or isinstance(self.clamp, tuple):
            bounds = self.clamp
        else:
            try:
                bounds = tuple(float(part) for part in str(self.clamp).split(","))
            except ValueError:
                bounds = ()
            if len(bounds) != 2:
                raise OptionError("clamp", f"expected LO,HI such as 0.4,0.6 (got '{self.clamp}')")
        if bounds is not None and not 0 <= bounds[0] <= bounds[1] <= 1:
            raise OptionError("clamp", f"need 0 ≤ LO ≤ HI ≤ 1 (got {self.clamp})")
        return bounds

    def filters_described(self) -> str:
        """What drops this run's pairs, as its records' provenance records it: "off", or "on"
        with what differs from the default filters ("on+refusal, similarity 0.8")."""
        if not self.filter:
            return "off"
        return ("on" + ("+refusal" if self.drop_refusals else "")
                + (f", similarity {self.similarity:g}" if self.similarity != CurationOptions.similarity else ""))

    def judge_config(self, prefix: str | None = None):
        from cai.judging import JudgeConfig

        config = JudgeConfig(clamp=self.clamp_bounds())
        return config if prefix is None else JudgeConfig(prefix=prefix, clamp=config.clamp)


@dataclass
class GenerateOptions(BackendSpec, CurationOptions):
    """Every option of `cai generate` (see its --help, or the table of docs/commands/generate.md)."""

    constitution: str | Constitution = option("harmless", "--constitution", "-c", cli=str, panel="Generation", help=(
        "A shipped constitution by name (see `cai constitution list`) or a path to a YAML file."))
    templates: str = option("default", "--templates", panel="Generation", help=(
        "Prompt templates: a shipped set by name or a folder of .jinja files."))
    input_format: str | None = option(None, "--input-format", choices=INPUT_FORMATS, panel="Input", help=(
        "The prompts' format, for stdin or a file whose name does not say it (default: told by the suffix, else JSONL "
        "when the first line starts with '{', else text)."))
    prompt_field: str = option("prompt", "--prompt-field", panel="Input", help=(
        "Field (or column) that holds the prompt: a string, a chat transcript (a messages list, ShareGPT "
        "conversations, or hh-rlhf 'Human: … Assistant: …' text), or a dotted path into nested fields. Without a "
        "'prompt' field, 'messages' or 'conversations' is used."))
    response_field: str | None = option(None, "--response-field", panel="Input", help=(
        "Field holding an existing answer to revise: only critique and revision run (a conversation ending with an "
        "assistant turn is taken the same way)."))
    regenerate: bool = option(False, "--regenerate", panel="Input", help=(
        "Drop a conversation's final assistant turn and have the model answer anew."))
    split: str | None = option(None, "--split", panel="Input", help=(
        "The split of a datasets folder or dataset id (train, test, …)."))
    reasoning: str = option("auto", "--reasoning", choices=REASONING_MODES, panel="Generation", help=(
        "Reasoning models: off tells the model not to think (its chat template's switch, or chat_template_kwargs to a "
        "server); keep lets it think and stores each turn's reasoning apart; drop lets it think and discards it; auto "
        "is off where the template has the switch, else drop. Reasoning never enters chosen, rejected or the history "
        "of later turns."))
    reasoning_tags: str = option("<think>,</think>", "--reasoning-tags", metavar="OPEN,CLOSE", panel="Generation", help=(
        "The tags around inline reasoning."))
    revisions: int | None = option(None, "--revisions", "-r", panel="Generation", help=(
        "Critique → revise rounds per prompt. Default: the constitution's (1)."))
    sampling: str | None = option(None, "--sampling", choices=SAMPLING_MODES, panel="Generation", help=(
        "Principle per prompt: random (weighted), all (one record per principle), cycle (round robin by the prompt's "
        "place in the input). Default: the constitution's (random)."))
    seed: int = option(0, "--seed", panel="Generation", help=(
        "Seed for principle choice and sampling: same seed, same records."))
    batch_size: int | None = option(None, "--batch-size", "-b", panel="Generation", help=(
        "Conversations in flight at once [default: as many as the KV cache fits, up to 128; with --backend openai, "
        "--concurrency]."))
    max_new_tokens: int = option(256, "--max-new-tokens", panel="Generation", help=(
        "Token limit of each generated turn."))
    temperature: float = option(0.7, "--temperature", panel="Generation", help=(
        "Sampling temperature; 0 is greedy."))
    top_p: float = option(0.95, "--top-p", panel="Generation", help=(
        "Nucleus sampling threshold (0 < p ≤ 1)."))
    few_shot: bool = option(True, "--few-shot/--no-few-shot", panel="Generation", help=(
        "Show the constitution's worked examples to the model as earlier turns."))
    limit: int | None = option(None, "--limit", "-n", panel="Output and resume", help=(
        "Use only the first N prompts of the input."))
    resume: bool = option(False, "--resume", panel="Output and resume", help=(
        "Continue an existing output (the default when it holds records of the same run): skip the ids it holds, "
        "append the rest."))
    overwrite: bool = option(False, "--overwrite", panel="Output and resume", help=(
        "Replace an existing output file."))
    force: bool = option(False, "--force", panel="Output and resume", help=(
        "Append to an output that holds records of a different run config."))
    skip_invalid: bool = option(False, "--skip-invalid", panel="Input", help=(
        "Skip malformed input lines (listed in the skipped file) instead of stopping."))
    truncate_long: bool = option(False, "--truncate-long", panel="Input", help=(
        "Cut prompts too long for the model's context instead of skipping them."))
    format: str = option("standard", "--format", "-f", choices=FORMATS, panel="Output and resume", help=(
        "Record shape: standard (prompt/chosen/rejected strings) or conversational (lists of chat messages)."))
    failures: str | None = option(None, "--failures", panel="Output and resume", help=(
        "JSONL file for prompts whose requests failed after their retries [default: OUTPUT.failures.jsonl]."))
    skipped: str | None = option(None, "--skipped", panel="Output and resume", help=(
        "JSONL file for prompts skipped as too long or invalid [default: OUTPUT.skipped.jsonl]."))
    fail_fast: bool = option(False, "--fail-fast", panel="Run", help=(
        "Stop the run at the first prompt that fails (instead of recording it in the failures file)."))
    shard: str | tuple[int, int] | None = option(None, "--shard", metavar="K/N|auto", cli=Optional[str], panel="Output and resume", help=(
        "Take only shard K of N (1 ≤ K ≤ N), a deterministic slice of the prompts by id; combine shard outputs with "
        "`cai merge`. auto: K and N from a Slurm array job (SLURM_ARRAY_TASK_ID/_MIN/_COUNT) or a Kubernetes Indexed "
        "Job (JOB_COMPLETION_INDEX, with auto/N). An output name may hold {shard} (-o pairs.{shard}.jsonl)."))
    grace: float = option(15.0, "--grace", metavar="SECONDS", panel="Run", help=(
        "After Ctrl-C, SIGTERM or SIGHUP: how long conversations in flight may take to finish before the run stops at "
        "once."))
    lock: bool = option(True, "--no-lock", invert=True, panel="Run", help=(
        "Do not lock the output (only where the file system cannot lock and you are sure no other run writes it)."))

    # the paper's second stage (sampled pairs labelled by a feedback model) and first-stage variants
    samples: int | None = option(None, "--samples", metavar="N", panel="Generation", help=(
        "The paper's second stage: sample N (≥ 2) answers per prompt (each seeded on its own; set --temperature "
        "above 0) and let the feedback model pick the better of each pair; records are best against worst (or, with "
        "--min-margin, every pair decided enough), the label in judge.label and the whole comparison in "
        "meta.feedback."))
    principles_per_comparison: int = option(1, "--principles-per-comparison", metavar="K", panel="Judge", help=(
        "With --samples: principles asked per comparison (each in both orders; drawn by --seed, weighted); the label "
        "is their mean probability."))
    min_margin: float | None = option(None, "--min-margin", metavar="M", panel="Judge", help=(
        "With --samples: a record for every pair whose margin |2p - 1| is at least M (0-1), instead of best against "
        "worst; a prompt with none is dropped (reason: margin)."))
    cot: bool = option(False, "--cot", panel="Judge", help=(
        "With --samples: the feedback model reasons step by step before it answers; the reasoning is stored in "
        "meta.feedback.cot, and labels are clamped to 0.4,0.6 unless --clamp says otherwise."))
    judge_model: Any = option(None, "--judge-model", cli=Optional[str], panel="Judge", help=(
        "The feedback model of --samples or --judge (default: the policy model itself): a local folder, a .gguf "
        "file, a Hub id, or with --judge-backend openai the name the server serves."))
    judge_backend: str | None = option(None, "--judge-backend", choices=registry.names(), panel="Judge", help=(
        "The feedback model's backend [default: hf, or openai with --judge-base-url]."))
    judge_base_url: str | list[str] | None = option(None, "--judge-base-url", cli=Optional[list[str]], panel="Judge", help=(
        "The feedback model's server (API root); give it again for more servers of the same model."))
    judge_api_key_env: str | None = option(None, "--judge-api-key-env", metavar="NAME", panel="Judge", help=(
        "The environment variable holding the feedback server's API key."))
    judge_concurrency: int | None = option(None, "--judge-concurrency", panel="Judge", help=(
        "Requests in flight at once to the feedback server [default: --concurrency]."))
    critique: bool = option(True, "--critique/--no-critique", panel="Generation", help=(
        "--no-critique: each round revises the answer directly against its principle, without a critique first "
        "(the paper found it as good for large models)."))
    keep_rounds: bool = option(False, "--keep-rounds", panel="Generation", help=(
        "With --revisions above 1: a record for each round (its revision against the one before it) as well as the "
        "final pair."))

    def check(self) -> None:
        check_types(self)
        self._check_feedback()
        if self.resume and self.overwrite:
            raise OptionError("resume", "contradicts `overwrite`; pick one")
        for name in ("revisions", "batch_size", "max_new_tokens", "limit"):
            _at_least(name, getattr(self, name), 1)
        if self.revisions is not None and self.revisions > MAX_REVISIONS:
            raise OptionError("revisions", f"must be at most {MAX_REVISIONS} (got {self.revisions}); each revision is "
                              "two more turns of one conversation")
        _at_least("repairs", self.repairs, 0)
        if self.temperature < 0:
            raise OptionError("temperature", f"must be 0 (greedy) or more (got {self.temperature:g})")
        if not 0 < self.top_p <= 1:
            raise OptionError("top_p", f"must be greater than 0 and at most 1 (got {self.top_p:g})")
        self.tags()
        if self.regenerate and self.response_field:
            raise OptionError("regenerate", "contradicts `response_field` (a given response to revise); pick one")
        if self.grace < 0:
            raise OptionError("grace", f"must be 0 or more seconds (got {self.grace:g})")
        BackendSpec.check(self)
        CurationOptions.check(self, self.judge or self.samples is not None)
        self.shard_numbers()

    def _check_feedback(self) -> None:
        """issue 33's options: each one-line error names the option, before anything loads."""
        sampled = self.samples is not None
        if isinstance(self.judge_model, os.PathLike):
            self.judge_model = os.fspath(self.judge_model)
        if self.judge_model is not None and not isinstance(self.judge_model, str) \
                and not hasattr(self.judge_model, "model_name"):
            raise OptionError("judge_model", f"expected a model name or path, or an open backend (got "
                                             f"{type(self.judge_model).__name__})")
        if sampled and self.samples < 2:
            raise OptionError("samples", f"must be at least 2 (got {self.samples}): a pair needs two answers")
        _at_least("principles_per_comparison", self.principles_per_comparison, 1)
        _at_least("judge_concurrency", self.judge_concurrency, 1)
        if self.min_margin is not None and not 0 <= self.min_margin <= 1:
            raise OptionError("min_margin", f"must be between 0 and 1 (got {self.min_margin:g})")
        if not sampled:
            for name, unset in (("principles_per_comparison", 1), ("min_margin", None), ("cot", False)):
                if getattr(self, name) is not unset and getattr(self, name) != unset:
                    raise OptionError(name, "needs `samples` N (answers compared by the feedback model)")
        if not (sampled or self.judge) and any(getattr(self, name) is not None for name in (
                "judge_model", "judge_backend", "judge_base_url", "judge_api_key_env", "judge_concurrency")):
            raise OptionError("judge_model", "names the feedback model of `samples` or `judge`; give one of them")
        if sampled:
            for name, hint in (("judge", "`samples` labels every pair with the feedback model already"),
                               ("swap", "the chosen answer of a sampled pair is always the preferred one"),
                               ("min_preference", "use `min_margin`"),
                               ("response_field", "a given response cannot be sampled N times"),
                               ("revisions", "sampled pairs have no critique rounds")):
                if getattr(self, name) not in (None, False):
                    raise OptionError(name, f"does not go with `samples`: {hint}")
            if self.sampling is not None:
                raise OptionError("sampling", "does not go with `samples`: the principles of each comparison are "
                                              "drawn for it (`principles_per_comparison`)")
            if not self.critique or self.keep_rounds:
                raise OptionError("critique" if not self.critique else "keep_rounds",
                                  "is for critique-and-revise runs, not `samples`")
            if self.cot and self.clamp is None:
                from cai.feedback import COT_CLAMP

                self.clamp = COT_CLAMP                 # the paper's clamp of chain-of-thought labels
        if sampled or self.judge:
            # an open backend (the Python API's) must read option log-probabilities to give feedback
            given = self.judge_model if self.judge_model is not None else self.model
            name = "judge_model" if self.judge_model is not None else "model"
            if given is not None and not isinstance(given, (str, os.PathLike)) \
                    and not callable(getattr(given, "score_choices", None)):
                raise OptionError(name, f"{getattr(given, 'model_name', type(given).__name__)} gives no option "
                                        "log-probabilities (no score_choices), which the feedback is read from")
        spec = self.feedback_spec()
        if spec is not None:
            try:
                spec.check()
            except OptionError as exc:
                import re

                # the feedback model's own options: --judge-model, --judge-base-url, …
                raise OptionError(f"judge_{exc.option}", re.sub(r"`(model|backend|base_url|api_key_env|concurrency)`",
                                                              r"`judge_\1`", exc.detail)) from None

    def feedback_spec(self) -> BackendSpec | None:
        """The feedback model's BackendSpec, or None where the policy model gives the feedback.
        It shares the policy's local settings (device, dtype, threads, timeouts)."""
        if self.judge_model is None and self.judge_backend is None and self.judge_base_url is None:
            return None
        backend = self.judge_backend or ("openai" if self.judge_base_url else "hf")
        policy = self.backend_spec()
        values = {name: getattr(policy, name) for name in registry.owners()}      # the policy's settings…
        values.update(base_url=self.judge_base_url, base_urls=None, allow_down=False,
                      api_key_env=self.judge_api_key_env, concurrency=self.judge_concurrency or self.concurrency)
        # …where the feedback backend takes them; its own defaults elsewhere
        owned = {name for name, owners in registry.owners().items() if backend in owners}
        return BackendSpec(backend=backend, model=self.judge_model,
                           **{name: value for name, value in values.items() if name in owned})

    def feedback_config(self):
        """The FeedbackConfig of a run with `samples` (None without)."""
        from cai.feedback import FeedbackConfig

        if self.samples is None:
            return None
        return FeedbackConfig(samples=self.samples, principles=self.principles_per_comparison,
                              min_margin=self.min_margin, cot=self.cot, judge=self.judge_config())

    def tags(self) -> tuple[str, str]:
        """The (open, close) reasoning tags of `reasoning_tags`."""
        from cai.reasoning import parse_tags

        try:
            return parse_tags(self.reasoning_tags)
        except ValueError as exc:
            raise OptionError("reasoning_tags", str(exc)) from None

    def fields(self):
        """Where an input row keeps its prompt, its given response and its id."""
        from cai.rows import Fields

        return Fields(prompt=self.prompt_field, response=self.response_field, regenerate=self.regenerate)

    def shard_numbers(self) -> tuple[int, int]:
        """(K, N) of `shard` ('K/N', a pair, or 'auto' / 'auto/N': see `array_task`); (1, 1)
        without one."""
        if self.shard is None:
            return 1, 1
        if isinstance(self.shard, str) and self.shard.split("/")[0].strip() == "auto":
            k, n, _ = array_task(self.shard)
        elif isinstance(self.shard, tuple):
            k, n = self.shard
        else:
            try:
                k, n = (int(part) for part in str(self.shard).split("/"))
            except ValueError:
                raise OptionError("shard", f"expected K/N such as 2/8 (got '{self.shard}')") from None
        if not 1 <= k <= n:
            raise OptionError("shard", f"K must be between 1 and N (got {k}/{n})")
        return k, n

    def shard_task(self) -> dict:
        """Where the shard came from, for the run's manifest: the array's task, or nothing."""
        if isinstance(self.shard, str) and self.shard.split("/")[0].strip() == "auto":
            return array_task(self.shard)[2]
        return {}

    def named(self, path: str | None) -> str | None:
        """`path` with `{shard}` as this run's shard number K (`pairs.{shard}.jsonl`)."""
        if path is None or "{shard}" not in path:
            return path
        if self.shard is None:
            raise OptionError("output", f"{path} holds {{shard}}, but the run has no `shard`")
        return path.replace("{shard}", str(self.shard_numbers()[0]))

    def backend_spec(self) -> BackendSpec:
        return BackendSpec(**{f.name: getattr(self, f.name) for f in fields(BackendSpec)})


@dataclass
class PreviewOptions(GenerateOptions):
    """Every option of `cai preview`: a generation run's (its filters always on), and which
    principles to show. `limit`: prompts taken from a file (None: 1)."""

    # generate's options that preview words for itself
    constitution: str | Constitution = option("harmless", "--constitution", "-c", cli=str, panel="Generation", help=(
        "A shipped constitution by name or a path to a YAML file."))
    input_format: str | None = option(None, "--input-format", choices=INPUT_FORMATS, panel="Input", help=(
        "The prompts file's format, for stdin or a file whose name does not say it."))
    prompt_field: str = option("prompt", "--prompt-field", panel="Input", help=(
        "Field (or column) of a prompts file that holds the prompt."))
    reasoning: str = option("auto", "--reasoning", choices=REASONING_MODES, panel="Generation", help=(
        "Reasoning models: as `cai generate --reasoning`."))
    revisions: int | None = option(None, "--revisions", "-r", panel="Generation", help=(
        "Critique → revise rounds. Default: the constitution's (1)."))
    seed: int = option(0, "--seed", panel="Generation", help=(
        "Seed for the principle choice and sampling (a run with the same seed makes the same pair)."))
    limit: int | None = option(None, "--limit", "-n", panel="Input", help="Prompts taken from a file (default 1).")
    drop_refusals: bool = option(False, "--drop-refusals", panel="Curation", help=(
        "The verdict counts a refusing revision as dropped, as `cai generate --drop-refusals` does."))
    judge: bool = option(False, "--judge", panel="Judge", help=(
        "Also show the model's own AI-feedback preference, both orders (see `cai judge`)."))
    # preview's own
    principle: tuple[str, ...] = option((), "--principle", "-p", metavar="ID", cli=Optional[list[str]], panel="Generation", help=(
        "Critique and revise with this principle (every round); repeat for one conversation per principle. Default: "
        "the principle a run would pick for the prompt."))
    all: bool = option(False, "--all", panel="Generation", help="One conversation per principle of the constitution.")

    def check(self) -> None:
        GenerateOptions.check(self)
        if self.all and self.principle:
            raise OptionError("all", "contradicts `principle`; pick one")


@dataclass
class JudgeOptions(BackendSpec, CurationOptions):
    """Every option of `cai judge`."""

    judge: bool = True
    constitution: str | Constitution | None = option(None, "--constitution", "-c", cli=Optional[str], panel="Judge", help=(
        "Where the principles' judge questions (`choice`) come from [default: the shipped constitution the records "
        "name]."))
    templates: str = option("default", "--templates", panel="Judge", help=(
        "Template set whose judge.jinja words the question."))
    prefix: str = option("The answer is: (", "--prefix", panel="Judge", help=(
        "How the judge's answer starts; the option letter is read right after it."))
    batch_size: int = option(8, "--batch-size", "-b", panel="Run", help="Pairs scored per call to the backend.")
    overwrite: bool = option(False, "--overwrite", panel="Output and resume", help="Replace OUTPUT if it exists.")
    lock: bool = option(True, "--no-lock", invert=True, panel="Run", help=(
        "Do not lock the output (only where the file system cannot lock and you are sure no other run writes it)."))

    def check(self) -> None:
        check_types(self)
        _at_least("batch_size", self.batch_size, 1)
        BackendSpec.check(self)
        CurationOptions.check(self, True)


def build(cls, options: dict[str, Any]):
    """`cls(**options)`, with an unknown option named as an OptionError (did-you-mean included)."""
    import difflib

    known = {f.name for f in fields(cls)}
    for name in options:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            raise OptionError(name, "unknown option" + (f"; did you mean `{close[0]}`?" if close else ""))
    return cls(**options)


SLURM_VARIABLES = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT")


def array_task(spec: str, environ=None) -> tuple[int, int, dict]:
    """(K, N, the task as the manifest records it) of `--shard auto` or `auto/N`, from a Slurm
    array job (SLURM_ARRAY_TASK_ID, _MIN, _COUNT, and _STEP where the array has one) or a
    Kubernetes Indexed Job (JOB_COMPLETION_INDEX, from 0; N from `auto/N`)."""
    env = os.environ if environ is None else environ
    parts = [p.strip() for p in spec.split("/")]
    if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise OptionError("shard", f"expected auto or auto/N such as auto/8 (got '{spec}')")
    given = int(parts[1]) if len(parts) == 2 else None
    if env.get("SLURM_ARRAY_TASK_ID") is not None:
        try:
            task, low, count = (int(env[name]) for name in SLURM_VARIABLES)
            step = int(env.get("SLURM_ARRAY_TASK_STEP") or 1)
        except (KeyError, ValueError):
            raise OptionError("shard", "auto: a Slurm array job sets " + ", ".join(SLURM_VARIABLES)
                              + " as integers; some are missing or not numbers") from None
        if step < 1 or (task - low) % step:
            raise OptionError("shard", f"auto: SLURM_ARRAY_TASK_ID {task} is not MIN {low} plus a multiple of "
                              f"STEP {step}; an array with gaps (--array=1,4,9) cannot be shards, use 0-{count - 1}")
        k, n = (task - low) // step + 1, count
        if given is not None and given != n:
            raise OptionError("shard", f"auto/{given}: the Slurm array has {n} tasks (SLURM_ARRAY_TASK_COUNT)")
        if not 1 <= k <= n:
            raise OptionError("shard", f"auto: SLURM_ARRAY_TASK_ID {task} is past the array's {n} tasks from {low}")
        return k, n, {"scheduler": "slurm", "task": task, "min": low, "step": step}
    if env.get("JOB_COMPLETION_INDEX") is not None:
        index = env["JOB_COMPLETION_INDEX"]
        if not index.isdigit():
            raise OptionError("shard", f"auto: JOB_COMPLETION_INDEX is {index!r}, not an index")
        if given is None:
            raise OptionError("shard", "auto: a Kubernetes Indexed Job does not say how many it has: give "
                              "auto/N, N its completions")
        if int(index) >= given:
            raise OptionError("shard", f"auto/{given}: JOB_COMPLETION_INDEX {index} is past the job's {given} "
                              "completions")
        return int(index) + 1, given, {"scheduler": "kubernetes", "task": int(index), "min": 0, "step": 1}
    raise OptionError("shard", "auto takes the shard from a Slurm array job (" + ", ".join(SLURM_VARIABLES)
                      + ") or a Kubernetes Indexed Job (JOB_COMPLETION_INDEX, with auto/N); none of them is set")
