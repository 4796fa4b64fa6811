"""The local transformers backend on the tiny model."""

from __future__ import annotations

import pytest

from cai.backends.base import SamplingParams
from cai.backends.hf import HFBackend, HFOptions
from cai.errors import ModelError, UsageError

CONVERSATIONS = [
    [{"role": "user", "content": "Hello there, how are you today?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Tell me about the quick brown fox and the lazy dog, please."}],
]


@pytest.fixture(scope="module")
def backend(tiny_model):
    return HFBackend(str(tiny_model), "tiny", HFOptions(device="cpu"))


def test_batched_greedy_equals_one_at_a_time(backend):
    """Left padding must not change what a conversation generates."""
    params = SamplingParams(max_new_tokens=8, temperature=0)
    batched = backend.generate(CONVERSATIONS, params)
    single = [backend.generate([c], params)[0] for c in CONVERSATIONS]
    assert [c.text for c in batched] == [c.text for c in single]
    assert [c.prompt_tokens for c in batched] == [c.prompt_tokens for c in single]


def test_completion_accounting(backend):
    params = SamplingParams(max_new_tokens=5, temperature=0)
    for completion, conversation in zip(backend.generate(CONVERSATIONS, params), CONVERSATIONS):
        assert completion.finish_reason in ("stop", "length")
        assert 1 <= completion.completion_tokens <= 5
        if completion.finish_reason == "length":
            assert completion.completion_tokens == 5
        rendered = backend.render(conversation)
        assert completion.prompt_tokens == len(backend.tokenizer(rendered, add_special_tokens=False)["input_ids"])


def test_sampling_is_reproducible_with_a_seed(backend):
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1.0)
    a = backend.generate(CONVERSATIONS, params, seed=3)
    b = backend.generate(CONVERSATIONS, params, seed=3)
    c = backend.generate(CONVERSATIONS, params, seed=4)
    assert a == b
    assert a != c


def test_pad_token_is_set_when_missing(tiny_model, tmp_path):
    import shutil
    import json

    copy = tmp_path / "nopad"
    shutil.copytree(tiny_model, copy)
    config_path = copy / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("pad_token", None)
    config_path.write_text(json.dumps(config))
    backend = HFBackend(str(copy), "nopad", HFOptions(device="cpu"))
    assert backend.tokenizer.pad_token_id is not None
    assert len(backend.generate(CONVERSATIONS[:2], SamplingParams(max_new_tokens=3, temperature=0))) == 2


def test_context_overflow_is_a_clear_error(backend):
    with pytest.raises(UsageError, match="exceeds the model's context of 4096"):
        backend.generate(CONVERSATIONS[:1], SamplingParams(max_new_tokens=5000, temperature=0))


def test_unknown_device_and_missing_model(tiny_model, tmp_path):
    with pytest.raises(UsageError, match="unknown device 'tpu'"):
        HFBackend(str(tiny_model), "tiny", HFOptions(device="tpu"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="cannot load model"):
        HFBackend(str(tmp_path), "empty", HFOptions(device="cpu"))
