"""Options of a run as typed objects, one field per command-line flag (its long name in snake
case: `--max-new-tokens` is `max_new_tokens`, `--no-filter` is `filter=False`). The CLI and the
Python API fill the same objects; `check()` validates every value before any input is read and
raises OptionError naming the option."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

from cai.backends.hf import DEVICES, DTYPES
from cai.constitution import SAMPLING_MODES
from cai.errors import OptionError
from cai.reasoning import MODES as REASONING_MODES
from cai.records import FORMATS

BACKENDS = ("hf", "openai")


def _at_least(name: str, value, low) -> None:
    if value is not None and value < low:
        raise OptionError(name, f"must be at least {low} (got {value})")


def _choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value is not None and value not in allowed:
        raise OptionError(name, f"unknown value '{value}'; choose from {', '.join(allowed)}")


@dataclass
class BackendSpec:
    """Which model, and how to reach it: a local transformers model (`hf`) or an OpenAI-compatible
    server (`openai`). `cai.backends.spec.open_backend` opens one."""

    backend: str = "hf"
    model: Any = None                # a name, a path or Hub id; or (Python API) a backend already open
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 120.0
    max_retries: int = 5
    concurrency: int = 16
    threads: int | None = None
    plain_chat_format: bool = False
    allow_pickle: bool = False
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False

    def check(self) -> None:
        _choice("backend", self.backend, BACKENDS)
        if isinstance(self.model, os.PathLike):
            self.model = os.fspath(self.model)
        if self.model is not None and not isinstance(self.model, str) and not hasattr(self.model, "stream"):
            raise OptionError("model", f"expected a model name or path, or an open backend (got {type(self.model).__name__})")
        if not isinstance(self.model, (str, type(None))):
            return                       # an open backend: nothing else here applies
        if self.backend == "openai" and (not self.base_url or not self.model):
            raise OptionError("backend", "openai needs `base_url` URL and `model` NAME (the name the server serves)")
        if self.backend == "hf" and self.base_url:
            raise OptionError("base_url", "is for `backend` openai")
        _at_least("max_retries", self.max_retries, 0)
        if self.timeout <= 0:
            raise OptionError("timeout", f"must be more than 0 (got {self.timeout:g})")
        _at_least("concurrency", self.concurrency, 1)
        _at_least("threads", self.threads, 1)
        _choice("device", self.device, DEVICES)
        _choice("dtype", self.dtype, DTYPES)


@dataclass
class CurationOptions:
    """What to keep: filters, then the judge."""

    filter: bool = True
    similarity: float = 0.9
    repairs: int = 3
    repair_from: str = "revision"
    drop_refusals: bool = False
    keep_filtered: bool = False
    filtered: str | None = None
    judge: bool = False
    min_preference: float | None = None
    swap: bool = False
    clamp: str | tuple[float, float] | None = None
    trust_disagreeing: bool = False

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
    """Every option of `cai generate` (see its --help, or the README's table)."""

    constitution: Any = "harmless"              # a name, a path, or a Constitution
    templates: str = "default"
    prompt_field: str = "prompt"
    response_field: str | None = None
    regenerate: bool = False
    split: str | None = None
    reasoning: str = "auto"
    reasoning_tags: str = "<think>,</think>"
    revisions: int | None = None
    sampling: str | None = None
    seed: int = 0
    batch_size: int | None = None
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    few_shot: bool = True
    limit: int | None = None
    resume: bool = False
    overwrite: bool = False
    force: bool = False
    skip_invalid: bool = False
    truncate_long: bool = False
    format: str = "standard"
    failures: str | None = None
    skipped: str | None = None
    fail_fast: bool = False
    shard: str | tuple[int, int] | None = None
    grace: float = 15.0
    lock: bool = True

    def check(self) -> None:
        if self.resume and self.overwrite:
            raise OptionError("resume", "contradicts `overwrite`; pick one")
        for name in ("revisions", "batch_size", "max_new_tokens", "limit"):
            _at_least(name, getattr(self, name), 1)
        _at_least("repairs", self.repairs, 0)
        _choice("repair_from", self.repair_from, ("revision", "critique"))
        if self.temperature < 0:
            raise OptionError("temperature", f"must be 0 (greedy) or more (got {self.temperature:g})")
        if not 0 < self.top_p <= 1:
            raise OptionError("top_p", f"must be greater than 0 and at most 1 (got {self.top_p:g})")
        _choice("sampling", self.sampling, SAMPLING_MODES)
        _choice("format", self.format, FORMATS)
        _choice("reasoning", self.reasoning, REASONING_MODES)
        self.tags()
        if self.regenerate and self.response_field:
            raise OptionError("regenerate", "contradicts `response_field` (a given response to revise); pick one")
        if self.grace < 0:
            raise OptionError("grace", f"must be 0 or more seconds (got {self.grace:g})")
        BackendSpec.check(self)
        CurationOptions.check(self, self.judge)
        self.shard_numbers()

    def tags(self) -> tuple[str, str]:
        """The (open, close) reasoning tags of `reasoning_tags`."""
        from cai.reasoning import parse_tags

        try:
            return parse_tags(self.reasoning_tags)
        except ValueError as exc:
            raise OptionError("reasoning_tags", str(exc)) from None

    def fields(self):
        """Where an input row keeps its prompt, its given response and its id."""
        from cai.conversations import Fields

        return Fields(prompt=self.prompt_field, response=self.response_field, regenerate=self.regenerate)

    def shard_numbers(self) -> tuple[int, int]:
        """(K, N) of `shard` ('K/N' or a pair); (1, 1) without one."""
        if self.shard is None:
            return 1, 1
        if isinstance(self.shard, tuple):
            k, n = self.shard
        else:
            try:
                k, n = (int(part) for part in str(self.shard).split("/"))
            except ValueError:
                raise OptionError("shard", f"expected K/N such as 2/8 (got '{self.shard}')") from None
        if not 1 <= k <= n:
            raise OptionError("shard", f"K must be between 1 and N (got {k}/{n})")
        return k, n

    def backend_spec(self) -> BackendSpec:
        return BackendSpec(**{f.name: getattr(self, f.name) for f in fields(BackendSpec)})


@dataclass
class PreviewOptions(GenerateOptions):
    """Every option of `cai preview`: a generation run's (its filters always on), and which
    principles to show. `limit`: prompts taken from a file (None: 1)."""

    principle: tuple[str, ...] = ()     # one conversation per principle named, every round with it
    all: bool = False                   # one conversation per principle of the constitution

    def check(self) -> None:
        GenerateOptions.check(self)
        if self.all and self.principle:
            raise OptionError("all", "contradicts `principle`; pick one")


@dataclass
class JudgeOptions(BackendSpec, CurationOptions):
    """Every option of `cai judge`."""

    judge: bool = True
    constitution: Any = None
    templates: str = "default"
    prefix: str = "The answer is: ("
    batch_size: int = 8
    overwrite: bool = False
    lock: bool = True

    def check(self) -> None:
        _at_least("batch_size", self.batch_size, 1)
        BackendSpec.check(self)
        CurationOptions.check(self, True)

    def backend_spec(self) -> BackendSpec:
        return BackendSpec(**{f.name: getattr(self, f.name) for f in fields(BackendSpec)})


def build(cls, options: dict[str, Any]):
    """`cls(**options)`, with an unknown option named as an OptionError (did-you-mean included)."""
    import difflib

    known = {f.name for f in fields(cls)}
    for name in options:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            raise OptionError(name, "unknown option" + (f"; did you mean `{close[0]}`?" if close else ""))
    return cls(**options)
