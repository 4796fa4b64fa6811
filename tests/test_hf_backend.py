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


# ---- errors name the option, not the flag ----

def test_device_and_dtype_errors_are_option_errors():
    from cai.backends.hf import pick_device, pick_dtype
    from cai.errors import OptionError

    with pytest.raises(OptionError) as caught:
        pick_device("tpu")
    assert caught.value.option == "device"
    assert str(caught.value) == "device: unknown device 'tpu'; choose from auto, cpu, cuda, mps"
    assert caught.value.flag() == "--device: unknown device 'tpu'; choose from auto, cpu, cuda, mps"
    with pytest.raises(OptionError) as caught:
        pick_dtype("float8", "cpu")
    assert caught.value.option == "dtype" and str(caught.value).startswith("dtype: unknown dtype 'float8'")
    with pytest.raises(OptionError) as caught:
        pick_dtype("int8", "cuda")
    assert str(caught.value) == "dtype: int8 is cai's CPU path; on cuda use bfloat16 or float16"
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(OptionError) as caught:
            pick_device("cuda")
        assert str(caught.value).startswith("device: cuda: no CUDA device is available")
    for error in ("--device", "--dtype"):
        assert error not in str(caught.value)


def test_context_overflow_names_the_option(backend):
    from cai.errors import OptionError

    with pytest.raises(OptionError) as caught:
        backend.generate(CONVERSATIONS[:1], SamplingParams(max_new_tokens=5000, temperature=0))
    assert caught.value.option == "max_new_tokens" and "--" not in str(caught.value)


# ---- bfloat16 on a CPU without bf16 units: refused before anything loads ----

def test_bfloat16_on_a_cpu_is_refused_before_the_model_loads(tiny_model, monkeypatch):
    import transformers

    from cai.backends import quant
    from cai.errors import OptionError

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the dtype was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", must_not_load)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", must_not_load)
    monkeypatch.setattr(quant, "cpu_has_bf16", lambda: False)
    with pytest.raises(OptionError) as caught:
        HFBackend(str(tiny_model), "tiny", HFOptions(dtype="bfloat16", device="cpu"))
    message = str(caught.value)
    assert message.startswith("dtype: bfloat16 on a CPU without bf16 hardware") and "\n" not in message
    assert message.endswith("use auto (float16 weights, float32 arithmetic), float32, float16 or int8")


# ---- weights that are truncated or corrupt ----

def _broken_copy(tiny_model, tmp_path, how: str):
    import os
    import shutil

    copy = tmp_path / how
    shutil.copytree(tiny_model, copy)
    weights = copy / "model.safetensors"
    data = weights.read_bytes()
    if how == "half":
        data = data[:len(data) // 2]
    elif how == "garbage":
        data = os.urandom(len(data))
    elif how == "empty":
        data = b""
    weights.write_bytes(data)
    return copy


@pytest.mark.parametrize("how, reason", [
    ("half", "deserializing header: incomplete metadata, file not fully covered"),
    ("garbage", "deserializing header: "),
    ("empty", "deserializing header: header too small"),
])
def test_truncated_or_corrupt_weights_are_one_line_model_errors(tiny_model, tmp_path, how, reason):
    with pytest.raises(ModelError) as caught:
        HFBackend(str(_broken_copy(tiny_model, tmp_path, how)), "cut", HFOptions(device="cpu"))
    message = str(caught.value)
    assert message.startswith(f"cannot load model 'cut': model.safetensors is truncated or corrupt: {reason}")
    assert "\n" not in message and len(message) < 300


def test_weights_that_do_not_fit_the_config_are_a_model_error(tiny_model, tmp_path):
    import json
    import shutil

    copy = tmp_path / "mismatch"
    shutil.copytree(tiny_model, copy)
    config = json.loads((copy / "config.json").read_text())
    config["intermediate_size"] *= 2
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"^cannot load model 'm': the shapes of its weights do not fit its config"):
        HFBackend(str(copy), "m", HFOptions(device="cpu"))


def test_cai_generate_with_cut_weights_says_so_without_a_traceback(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from cai.cli import app
    from conftest import ROOT, plumbing

    broken = _broken_copy(tiny_model, tmp_path, "half")
    result = CliRunner().invoke(app, plumbing(["generate", ROOT / "examples" / "prompts.jsonl", "--model", broken,
                                               "-o", tmp_path / "pairs.jsonl", "--device", "cpu"]))
    assert result.exit_code == 2, result.output
    assert "model.safetensors is truncated or corrupt" in " ".join(result.output.split())
    assert "Traceback" not in result.output
