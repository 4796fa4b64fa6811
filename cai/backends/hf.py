"""Local transformers backend: the tokenizer's chat template, left-padded batched generation."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cai.backends.base import ChoiceScores, Completion, LockstepStream, SamplingParams, TextCallback, single_tokens
from cai.backends.hf_load import detach_from_files, load_error
from cai.declare import option
from cai.errors import ModelError, OptionError, UsageError
from cai.model_files import quiet_transformers

log = logging.getLogger("cai")

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")


# Used with --plain-chat-format for tokenizers that have no chat template of their own.
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n\n' }}"
    "{% else %}{{ 'Assistant: ' + m['content'] + eos_token + '\n\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@dataclass(frozen=True)
class HFOptions:
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    allow_pickle: bool = False
    plain_chat_format: bool = False
    engine: bool = True              # False: plain `generate` batches (the reference path)
    threads: int | None = None       # torch CPU threads (None: torch's default, one per core)
    draft: bool = True               # the engine's prompt-lookup drafts (greedy turns)


@dataclass
class HFSettings:
    """`--backend hf`'s own options (see cai/backends/registry.py)."""

    device: str = option("auto", "--device", choices=DEVICES, panel="Model", help="Where the model runs.")
    dtype: str = option("auto", "--dtype", choices=DTYPES, metavar="auto|float32|bfloat16|float16|int8", panel="Model", help=(
        "Weights dtype. GPU: auto is bfloat16 (float16 without bf16). CPU: auto is bfloat16 where cai's bfloat16 "
        "kernels run (AVX512-BF16 and a C compiler: the fastest CPU mode; records named 'MODEL (bfloat16)'), else "
        "float16; float16 keeps linear weights in float16 and computes in float32 (same results to float16 rounding); "
        "bfloat16 runs the linears and attention on the CPU's bf16 units (AMX or AVX512-BF16; slightly less exact, "
        "answers that differ from other CPUs'); float32 is plain float32 (PyTorch's products, whose last bits depend "
        "on the batch); int8 quantizes the decoder's linears (a few percent less exact). All but float32 give the "
        "same records at any batch size."))
    threads: int | None = option(None, "--threads", panel="Model", help="CPU threads for torch [default: one per core].")
    plain_chat_format: bool = option(False, "--plain-chat-format", panel="Model", help=(
        "For a tokenizer without a chat template: use cai's plain 'User:/Assistant:' format."))
    allow_pickle: bool = option(False, "--allow-pickle", panel="Model", help=(
        "Allow pickle (.bin) checkpoints, which can run code: only for models you trust."))
    trust_remote_code: bool = option(False, "--trust-remote-code", panel="Model", help=(
        "Allow model code from the model's repository to run."))


def pick_device(requested: str) -> str:
    import torch

    if requested not in DEVICES:
        raise OptionError("device", f"unknown device '{requested}'; choose from {', '.join(DEVICES)}")
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise OptionError("device", "cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if requested == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise OptionError("device", "mps: the MPS backend is not available on this machine")
    return requested


def pick_dtype(requested: str, device: str):
    """The dtype the model is loaded in, decided before anything loads. On a CPU, float16 and int8
    load float32 and then hand the linear layers to fbgemm (see `linear_mode`), and bfloat16 loads
    float32 and hands them to the CPU's bf16 units; bfloat16 is refused on a CPU without them:
    torch would emulate it (a prefill 4-12x slower than float32 on a 2-core AVX2 CPU, for
    SmolLM2-135M's shapes)."""
    import torch

    from cai.backends.quant import cpu_has_bf16

    if requested not in DTYPES:
        raise OptionError("dtype", f"unknown dtype '{requested}'; choose from {', '.join(DTYPES)}")
    if requested == "int8" and device != "cpu":
        raise OptionError("dtype", f"int8 is cai's CPU path; on {device} use bfloat16 or float16")
    if requested == "bfloat16" and device == "cpu" and not cpu_has_bf16():
        raise OptionError("dtype", "bfloat16 on a CPU without bf16 hardware (AMX or AVX512-BF16) is emulated, "
                          "several times slower than float32; use auto (float16 weights, float32 arithmetic), "
                          "float32, float16 or int8")
    if device == "cpu" and requested in ("auto", "float16", "int8", "bfloat16"):
        return torch.float32      # loaded float32; linear_mode then converts the linears
    if requested == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16      # mps
    return getattr(torch, requested)


def linear_mode(requested: str, device: str) -> str | None:
    """How a CPU runs the linear layers (cai.backends.quant): for auto, bfloat16 where cai's
    bfloat16 kernels run (AVX512-BF16 and a C compiler: faster than float16 weights, and records
    as independent of batching), else float16 weights; float16 for float16, int8 for int8,
    bfloat16 for bfloat16, None (plain float32, or the GPU's own dtype) otherwise."""
    from cai.backends import quant

    if device != "cpu" or requested not in ("auto", "float16", "int8", "bfloat16"):
        return None
    if requested == "auto" and quant.native_bfloat16():
        return "bfloat16"
    reason = quant.available("bfloat16" if requested == "bfloat16" else "float16")
    if reason:
        if requested == "auto":
            log.info("%s; linear layers stay float32", reason)
            return None
        raise OptionError("dtype", f"{requested}: {reason}")
    return requested if requested in ("int8", "bfloat16") else "float16"


def weights_name(model_name: str, dtype: str) -> str:
    """The model name records carry on a CPU (`dtype`: the linear mode, or the requested dtype
    where there is none): int8 output is not float32 output, nor is that of the CPU's bfloat16
    linears, so such a run says so (and resuming a file across formats is refused like any other
    change of model). float16 weights give float32's answers (bench/precision.py)."""
    if dtype not in ("int8", "bfloat16"):
        return model_name
    suffix = f" ({dtype})"
    return model_name if model_name.endswith(suffix) else model_name + suffix


def keep_freed_memory() -> bool:
    """Has glibc keep freed blocks of up to 32 MiB for reuse instead of unmapping them.

    By default glibc serves every allocation over 128 KiB with a fresh mmap and returns it on free,
    so each activation PyTorch makes on a CPU is page-faulted in anew at every layer of every
    forward; keeping them cuts prefill time by about a quarter here. The peak is unchanged (the
    same tensors are live at once); the process just keeps its heap between forwards. Linux/glibc
    only; elsewhere nothing happens."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 256 << 20))


def has_thinking_switch(template) -> bool:
    """Whether a chat template (a string, or a dict of named ones) reads `enable_thinking`."""
    texts = template.values() if isinstance(template, dict) else [template]
    return any(isinstance(t, str) and "enable_thinking" in t for t in texts)


class HFBackend:
    """Generates with a transformers causal LM; conversations are rendered with the tokenizer's
    chat template. `stream` runs cai's continuous-batching engine (KV cache kept across turns and
    shared across conversations) where the architecture allows, and left-padded `generate`
    batches otherwise; `generate` is the plain path."""

    about = "a local transformers model"
    Settings = HFSettings

    @classmethod
    def check_settings(cls, spec) -> None:
        if spec.threads is not None and spec.threads < 1:
            raise OptionError("threads", f"must be at least 1 (got {spec.threads})")

    @classmethod
    def resolve(cls, spec) -> tuple[str, str]:
        """(the local folder to load, the name records carry): a local model or the embedded one
        (converting its GGUF file once), without loading any weights."""
        from cai.model_files import resolve_model

        source, model_name = resolve_model(spec.model)
        device = pick_device(spec.device)
        pick_dtype(spec.dtype, device)                  # refuses what cannot run here, before the name is made
        return source, weights_name(model_name, linear_mode(spec.dtype, device) or spec.dtype)

    @classmethod
    def from_spec(cls, spec, source: str, model_name: str) -> "HFBackend":
        return cls(source, model_name, HFOptions(
            device=spec.device, dtype=spec.dtype, trust_remote_code=spec.trust_remote_code,
            allow_pickle=spec.allow_pickle, plain_chat_format=spec.plain_chat_format, threads=spec.threads))

    def __init__(self, source: str, model_name: str, options: HFOptions = HFOptions()):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_name = model_name
        self.device = pick_device(options.device)
        self.dtype = pick_dtype(options.dtype, self.device)
        try:
            with quiet_transformers():
                self.tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=options.trust_remote_code)
                self.model = AutoModelForCausalLM.from_pretrained(
                    source, dtype=self.dtype, trust_remote_code=options.trust_remote_code,
                    use_safetensors=None if options.allow_pickle else True)
        except Exception as exc:  # noqa: BLE001 -- sorted by load_error; what it does not know goes on up
            error = load_error(exc, source, model_name)
            if error is None:
                raise
            raise error from None
        if options.threads:
            torch.set_num_threads(options.threads)
        if self.device == "cpu":
            keep_freed_memory()
        self.model.to(self.device).eval()
        self.linears = linear_mode(options.dtype, self.device)
        if self.linears:
            from cai.backends.quant import convert_linears

            convert_linears(self.model, self.linears)
            self.model_name = model_name = weights_name(model_name, self.linears)
        if self.device == "cpu":
            detach_from_files(self.model)
        if not self.tokenizer.chat_template:
            if not options.plain_chat_format:
                raise ModelError(f"{model_name}: the tokenizer has no chat template; use a chat model, or pass "
                                 "`plain_chat_format` to use cai's plain 'User:/Assistant:' format")
            self.tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
        self.thinking_switch = has_thinking_switch(self.tokenizer.chat_template)
        self.thinking: bool | None = None
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.stop_ids = self._stop_ids()
        from cai.backends.runner import attention_implementation, context_length

        self.context_length = context_length(self.model)
        self.attn_implementation = attention_implementation(self.model)
        self.use_engine = options.engine
        self.draft = options.draft
        self.engine = None
        log.info("loaded %s on %s (%s)", model_name, self.device,
                 ("bfloat16 linear layers on the CPU's bf16 units, float32 elsewhere" if self.linears == "bfloat16"
                  else f"{self.linears} linear weights, float32 arithmetic") if self.linears
                 else str(self.dtype).replace("torch.", ""))

    def _stop_ids(self) -> list[int]:
        ids: set[int] = set()
        configured = self.model.generation_config.eos_token_id
        for value in configured if isinstance(configured, list) else [configured]:
            if value is not None:
                ids.add(int(value))
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id and tid >= 0:
                ids.add(tid)
        return sorted(ids)

    def encode(self, conversation: list[dict[str, str]]) -> list[int]:
        return self.tokenizer(self.render(conversation), add_special_tokens=False)["input_ids"]

    def stream(self, params: SamplingParams, width: int, longest: int | None = None,
               on_text: TextCallback | None = None):
        import torch

        from cai.backends.engine import Engine
        from cai.backends.engine_stream import EngineStream
        from cai.backends.runner import unsupported_reason

        reason = unsupported_reason(self.model)
        if reason or not self.use_engine:
            if reason:
                log.info("%s: %s; using plain batched generate", self.model_name, reason)
            return LockstepStream(self, params, width, on_text)
        # beside bf16 linears, keys and values are kept in bfloat16 too (half the bytes a step reads)
        kv_dtype = torch.bfloat16 if self.linears == "bfloat16" else None
        self.engine = Engine(self.model, slots=width, stop_ids=self.stop_ids, context_length=self.context_length,
                             draft=self.draft, capacity=longest, kv_dtype=kv_dtype)
        return EngineStream(self, self.engine, params, on_text)

    def default_width(self) -> int:
        """Conversations in flight when --batch-size is not given: as many as a KV cache of 1,024
        positions a conversation fits in (half the free GPU memory, or up to 6 GiB of RAM),
        at most 128; 8 without the engine. A slot holds only a conversation's own positions (the
        shared prefix is stored once), and 128 in flight made 8% more pairs a minute than 64 on
        128 prompts here (bench/batch128.json)."""
        import os

        import torch
        from cai.backends.runner import kv_bytes_per_token, unsupported_reason

        if not self.use_engine or unsupported_reason(self.model):
            return 8
        per_token = kv_bytes_per_token(self.model)
        if self.device == "cuda":
            budget = torch.cuda.mem_get_info()[0] / 2
        else:
            budget = min(6 << 30, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") / 2)
        return max(1, min(128, int(budget // (per_token * 1024))))

    def decode(self, tokens: list[int], finish_reason: str, prompt_tokens: int) -> Completion:
        kept = tokens[:-1] if finish_reason == "stop" else tokens
        return Completion(text=self.tokenizer.decode(kept, skip_special_tokens=True).strip(),
                          finish_reason=finish_reason, prompt_tokens=prompt_tokens, completion_tokens=len(tokens))

    def set_thinking(self, enabled: bool | None) -> None:
        """Render with `enable_thinking=enabled` from now on, where the template takes it (None:
        the template's default). Without the switch the rendering stays as it is."""
        self.thinking = None if enabled is None else bool(enabled)

    def render(self, conversation: list[dict[str, str]]) -> str:
        """The conversation as the model sees it, generation prompt included: the one place every
        path (encode, count_tokens, generate, score_choices) renders through."""
        extra = {"enable_thinking": self.thinking} if self.thinking_switch and self.thinking is not None else {}
        return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True, **extra)

    def count_tokens(self, conversation: list[dict[str, str]]) -> int:
        return len(self.encode(conversation))

    def generate(self, conversations: list[list[dict[str, str]]], params: SamplingParams,
                 seed: int | None = None) -> list[Completion]:
        import torch
        from transformers import GenerationConfig

        if not conversations:
            return []
        texts = [self.render(c) for c in conversations]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        width = batch["input_ids"].shape[1]
        if self.context_length and width + params.max_new_tokens > self.context_length:
            raise OptionError("max_new_tokens", f"a conversation of {width} tokens plus {params.max_new_tokens} "
                                                f"new tokens exceeds the model's context of {self.context_length}")
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens, do_sample=not params.greedy,
            temperature=params.temperature if not params.greedy else None,
            top_p=params.top_p if not params.greedy else None, top_k=None if not params.greedy else None,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.stop_ids,
        )
        if seed is not None:
            torch.manual_seed(seed)
        with torch.inference_mode(), self._plain_attention():
            output = self.model.generate(**batch, generation_config=config)
        new_tokens = output[:, width:].tolist()
        prompt_lengths = batch["attention_mask"].sum(dim=1).tolist()
        stops = set(self.stop_ids)
        completions = []
        for row, prompt_len in zip(new_tokens, prompt_lengths):
            end = next((i for i, t in enumerate(row) if t in stops), None)
            tokens = row if end is None else row[:end + 1]
            completions.append(self.decode(tokens, "length" if end is None else "stop", int(prompt_len)))
        return completions

    def _plain_attention(self):
        """The model's own attention implementation for a plain forward, and the engine's again
        afterwards (the engine switches the model to its cascade attention)."""
        from cai.backends.runner import plain_attention

        return plain_attention(self.model, self.attn_implementation)

    # Forward passes of `score_choices` hold at most this many tokens (rows × padded length).
    SCORE_TOKENS = 4096

    def score_choices(self, conversations: list[list[dict[str, str]]], choices: tuple[str, ...],
                      prefix: str = "") -> list[ChoiceScores]:
        """One forward pass per conversation (batched by length): the log-softmax of the logits
        after the rendered conversation plus `prefix`, at the tokens that spell each choice (with
        or without a leading space; several such tokens are summed in probability)."""
        import torch

        candidates = {choice: self._choice_tokens(choice) for choice in choices}
        encoded = [self.tokenizer(self.render(c) + prefix, add_special_tokens=False)["input_ids"] for c in conversations]
        results: list[ChoiceScores | None] = [None] * len(encoded)
        for i, ids in enumerate(encoded):
            if self.context_length and len(ids) > self.context_length:
                results[i] = ChoiceScores({}, error=f"the judge prompt of {len(ids)} tokens exceeds "
                                                    f"the model's context of {self.context_length}")
        order = sorted((i for i in range(len(encoded)) if results[i] is None), key=lambda i: len(encoded[i]))
        pad = self.tokenizer.pad_token_id
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and (end - start + 1) * len(encoded[order[end]]) <= self.SCORE_TOKENS:
                end += 1
            rows_idx, start = order[start:end], end
            rows = [encoded[i] for i in rows_idx]
            width = len(rows[-1])                  # sorted by length: the last is the longest
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode(), self._plain_attention():
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                    logits_to_keep=1).logits[:, -1, :]
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            for row, i in enumerate(rows_idx):
                results[i] = ChoiceScores({choice: torch.logsumexp(logprobs[row, tokens], 0).item()
                                           for choice, tokens in candidates.items()})
        return results

    def _choice_tokens(self, choice: str) -> list[int]:
        """The single tokens that spell `choice`, bare and after a space."""
        return single_tokens(lambda text: self.tokenizer(text, add_special_tokens=False)["input_ids"], choice,
                             self.model_name)

    def close(self) -> None:
        self.model = None
        self.engine = None

