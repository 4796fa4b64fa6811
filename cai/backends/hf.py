"""Local transformers backend: the tokenizer's chat template, left-padded batched generation."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cai.backends.base import Completion, SamplingParams
from cai.errors import ModelError, UsageError
from cai.models import quiet_transformers

log = logging.getLogger("cai")

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")


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


def pick_device(requested: str) -> str:
    import torch

    if requested not in DEVICES:
        raise UsageError(f"--device: unknown device '{requested}'; choose from {', '.join(DEVICES)}")
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if requested == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps: the MPS backend is not available on this machine")
    return requested


def pick_dtype(requested: str, device: str):
    import torch

    if requested not in DTYPES:
        raise UsageError(f"--dtype: unknown dtype '{requested}'; choose from {', '.join(DTYPES)}")
    if requested == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device == "mps":
            return torch.float16
        return torch.float32      # CPUs without bf16 units run float32 fastest
    return getattr(torch, requested)


class HFBackend:
    """Generates with a transformers causal LM. Conversations are rendered with the tokenizer's
    chat template and decoded together, left-padded, in one `generate` call per batch."""

    def __init__(self, source: str, model_name: str, options: HFOptions = HFOptions()):
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
        except (OSError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "pickle" in reason.lower() or ".bin" in reason or "safetensors" in reason.lower():
                reason += " (cai loads safetensors weights only; --allow-pickle loads pickle checkpoints you trust)"
            raise ModelError(f"cannot load model '{model_name}': {reason}") from None
        self.model.to(self.device).eval()
        if not self.tokenizer.chat_template:
            if not options.plain_chat_format:
                raise ModelError(f"{model_name}: the tokenizer has no chat template; use a chat model, or pass "
                                 "--plain-chat-format to use cai's plain 'User:/Assistant:' format")
            self.tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.stop_ids = self._stop_ids()
        self.context_length = getattr(self.model.config, "max_position_embeddings", None)
        log.info("loaded %s on %s (%s)", model_name, self.device, str(self.dtype).replace("torch.", ""))

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

    def render(self, conversation: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)

    def count_tokens(self, conversation: list[dict[str, str]]) -> int:
        return len(self.tokenizer(self.render(conversation), add_special_tokens=False)["input_ids"])

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
            raise UsageError(f"a conversation of {width} tokens plus --max-new-tokens "
                             f"{params.max_new_tokens} exceeds the model's context of {self.context_length}")
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens, do_sample=not params.greedy,
            temperature=params.temperature if not params.greedy else None,
            top_p=params.top_p if not params.greedy else None, top_k=None if not params.greedy else None,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.stop_ids,
        )
        if seed is not None:
            torch.manual_seed(seed)
        with torch.inference_mode():
            output = self.model.generate(**batch, generation_config=config)
        new_tokens = output[:, width:].tolist()
        prompt_lengths = batch["attention_mask"].sum(dim=1).tolist()
        stops = set(self.stop_ids)
        completions = []
        for row, prompt_len in zip(new_tokens, prompt_lengths):
            end = next((i for i, t in enumerate(row) if t in stops), None)
            kept = row if end is None else row[:end]
            text = self.tokenizer.decode(kept, skip_special_tokens=True).strip()
            completions.append(Completion(
                text=text, finish_reason="length" if end is None else "stop",
                prompt_tokens=int(prompt_len), completion_tokens=len(row) if end is None else end + 1))
        return completions

    def close(self) -> None:
        self.model = None
