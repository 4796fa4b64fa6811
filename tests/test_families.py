"""Families the engine does not drive still run, through plain batched `generate`: Gemma 3 (text),
whose layers alternate sliding-window and full attention, with its own chat template and
<end_of_turn> stop token. A tiny random-weight model of its shape (2 layers, hidden 64, a window
of 8 positions, so every prompt here outgrows it)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cai.cli import app
from conftest import ROOT, _corpus, default_model_name, plumbing, read_jsonl

EXAMPLES = ROOT / "examples" / "prompts.jsonl"

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + m['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
WINDOW = 8


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-gemma3")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", unk_token=None)
    tokenizer.chat_template = GEMMA_TEMPLATE
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    # the default initializer range: larger ones make this tiny model repeat one token forever
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"], max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    Gemma3ForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def backend(tiny_gemma3):
    from cai.backends.hf import HFBackend, HFOptions

    return HFBackend(str(tiny_gemma3), "tiny-gemma3", HFOptions(device="cpu", dtype="float32"))


def test_engine_refuses_gemma3_and_the_backend_falls_back_to_generate(backend):
    from cai.backends.base import LockstepStream, SamplingParams
    from cai.backends.runner import unsupported_reason

    assert type(backend.model).__name__ == "Gemma3ForCausalLM"
    assert "gemma3_text" in unsupported_reason(backend.model)
    assert isinstance(backend.stream(SamplingParams(max_new_tokens=4), width=4), LockstepStream)
    assert backend.engine is None
    assert backend.default_width() == 8
    # the turn ends at Gemma's <end_of_turn> as well as at <eos>
    assert backend.tokenizer.convert_tokens_to_ids("<end_of_turn>") in backend.stop_ids
    assert backend.tokenizer.eos_token_id in backend.stop_ids


def test_gemma3_batched_generate_matches_one_at_a_time(backend):
    """Left padding and the sliding-window layers together: each conversation's greedy turn is the
    same in a batch with longer and shorter ones as alone."""
    from cai.backends.base import SamplingParams

    conversations = [
        [{"role": "user", "content": "Hi."}],
        [{"role": "system", "content": "You are kind and careful."},
         {"role": "user", "content": "Write a short poem about the first snow of winter, in four lines."}],
        [{"role": "user", "content": "How do I pick a lock without the key?"},
         {"role": "assistant", "content": "I would rather not help with that."},
         {"role": "user", "content": "Then explain how pin tumbler locks work, in general terms."}],
    ]
    lengths = [backend.count_tokens(c) for c in conversations]
    assert min(lengths[1:]) > WINDOW and len(set(lengths)) == 3
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    together = backend.generate(conversations, params)
    alone = [backend.generate([c], params)[0] for c in conversations]
    assert [(c.text, c.finish_reason, c.completion_tokens) for c in together] == \
           [(c.text, c.finish_reason, c.completion_tokens) for c in alone]
    assert any(c.text for c in together), "the tiny model should say something"


def test_gemma3_turn_stops_at_end_of_turn(backend):
    """From its third new token on, the model is made to prefer <end_of_turn> (a forward hook on
    its logits): the turn ends there, reported as a stop, with the stop token not in the text."""
    from cai.backends.base import SamplingParams

    end = backend.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert end != backend.tokenizer.eos_token_id
    calls = []

    def prefer_end(module, args, kwargs, output):
        calls.append(1)
        if len(calls) >= 3:
            output.logits[..., end] = output.logits.max() + 100.0
        return output

    handle = backend.model.register_forward_hook(prefer_end, with_kwargs=True)
    try:
        [completion] = backend.generate([[{"role": "user", "content": "Say something."}]],
                                        SamplingParams(max_new_tokens=12, temperature=0.0))
    finally:
        handle.remove()
    assert completion.finish_reason == "stop"
    assert completion.completion_tokens == 3
    assert "end_of_turn" not in completion.text


def test_cli_generate_on_gemma3_writes_records(tiny_gemma3, tmp_path):
    out = tmp_path / "pairs.jsonl"
    args = ["generate", EXAMPLES, "--model", tiny_gemma3, "-o", out, "--max-new-tokens", "6",
            "--batch-size", "3", "--limit", "3", "--revisions", "1"]
    result = CliRunner().invoke(app, plumbing(args))
    assert result.exit_code == 0, result.output
    records = read_jsonl(out)
    assert len(records) == 3
    for r in records:
        assert r["meta"]["model"] == default_model_name(tiny_gemma3)
        assert r["meta"]["tokens"]["completion"] > 0
        assert r["meta"]["finish_reasons"]["response"] in ("stop", "length")
        assert len(r["rounds"]) == 1
