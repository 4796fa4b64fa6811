"""CPU linear layers (cai.backends.quant): fbgemm float16-weight and int8 linears, how a model is
converted, how --dtype picks them, and the engine and CLI on a converted model."""

from __future__ import annotations

import random

import pytest
import torch
from typer.testing import CliRunner

from cai.backends import quant
from cai.backends.engine import Engine
from cai.backends.hf import HFBackend, HFOptions, keep_freed_memory, linear_mode, pick_dtype, weights_name
from cai.backends.quant import Bfloat16Linear, Float16WeightLinear, Int8Linear, convert_linears
from cai.backends.runner import unsupported_reason
from cai.cli import app
from cai.errors import UsageError
from conftest import ROOT, plumbing, read_jsonl
from test_engine import VOCAB, _reference, _run, _tiny

needs_fbgemm = pytest.mark.skipif(quant.available() is not None, reason=str(quant.available()))
needs_bf16 = pytest.mark.skipif(quant.available("bfloat16") is not None, reason=str(quant.available("bfloat16")))

EXAMPLES = ROOT / "examples" / "prompts.jsonl"
FAST = ["--max-new-tokens", "6", "--batch-size", "4", "--no-filter", "--device", "cpu"]


def _linear(in_features=48, out_features=40, bias=True, seed=0) -> torch.nn.Linear:
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=g) * 0.5)
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=g))
    return linear.eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _mixed_rows(n=37, features=48, seed=1) -> torch.Tensor:
    """Rows whose magnitudes span nine orders, some all-positive, some all-negative, one zero."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, features, generator=g)
    rows *= torch.logspace(-4, 5, n).unsqueeze(1)          # 1e-4 … 1e5
    rows[3] = rows[3].abs()                                  # min > 0: fbgemm's own range would not be [-1, 1]
    rows[7] = -rows[7].abs()                                 # max < 0
    rows[11] = 0.0
    rows[20, 0] = 1e3 * rows[20].abs().max()                 # one outlier column
    return rows


# --- Int8Linear ---------------------------------------------------------------------------------

@needs_fbgemm
def test_int8_row_alone_is_bit_identical_to_the_same_row_in_a_batch():
    layer = Int8Linear(_linear())
    rows = _mixed_rows()
    with torch.inference_mode():
        batch = layer(rows)
        for i in range(rows.shape[0]):
            alone = layer(rows[i:i + 1])
            assert torch.equal(alone[0], batch[i]), i
        # and in any other company: reversed order, a sub-batch of three
        assert torch.equal(layer(rows.flip(0)).flip(0), batch)
        assert torch.equal(layer(rows[[5, 30, 3]]), batch[[5, 30, 3]])


@needs_fbgemm
def test_int8_is_close_to_float32_for_every_row_whatever_its_scale():
    linear = _linear()
    layer = Int8Linear(linear)
    rows = _mixed_rows()
    with torch.inference_mode():
        got, want = layer(rows), linear(rows)
        assert _rel(got, want) < 0.05
        weight_only = torch.nn.functional.linear(rows, linear.weight)       # the part that is quantized
        for i in range(rows.shape[0]):
            if i == 11:
                continue
            assert _rel(got[i] - linear.bias, weight_only[i]) < 0.05, i   # per-row scaling: tiny rows too
        assert torch.allclose(got[11], linear.bias), "a zero row gives the bias, not NaN"
        assert not torch.equal(got, want), "int8 output identical to float32: nothing was quantized"


@needs_fbgemm
def test_int8_bias_and_no_bias():
    with_bias, without = _linear(bias=True, seed=3), _linear(bias=False, seed=3)
    assert torch.equal(with_bias.weight, without.weight)
    x = torch.randn(9, 48)
    with torch.inference_mode():
        a, b = Int8Linear(with_bias)(x), Int8Linear(without)(x)
        assert Int8Linear(without).bias is None
        assert torch.allclose(a - b, with_bias.bias.expand_as(a), atol=1e-5)
        assert _rel(b, without(x)) < 0.05


@needs_fbgemm
def test_int8_keeps_leading_dimensions_and_dtype():
    linear = _linear()
    layer = Int8Linear(linear)
    x = torch.randn(3, 5, 48)
    with torch.inference_mode():
        out = layer(x)
        assert out.shape == (3, 5, 40) and out.dtype == torch.float32
        assert torch.equal(out.reshape(15, 40), layer(x.reshape(15, 48)))
        assert _rel(out, linear(x)) < 0.05
        assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16
        assert layer(torch.randn(48)).shape == (40,)


# --- Bfloat16Linear -----------------------------------------------------------------------------

@needs_bf16
@pytest.mark.parametrize("kernel", ["native", "onednn"])
@pytest.mark.parametrize("shape", [(48, 40, True), (576, 192, False), (37, 130, True)])
def test_bfloat16_rows_are_the_same_bits_alone_and_in_any_batch(kernel, shape, monkeypatch):
    """A row's output does not depend on the rows beside it, with cai's kernel (built here) or
    oneDNN's in fixed tiles (no compiler): alone, among 37, in another place, after a slice.
    Odd widths and widths off the kernel's panel of 64 included; the product is float32 sums
    of bfloat16-rounded inputs and weights."""
    from cai.backends import kernels

    if kernel == "onednn":
        monkeypatch.setattr(kernels, "_loaded", {"lib": None})
    elif kernels.linear_bf16() is None:
        pytest.skip("cai's bfloat16 kernel is not built here (no compiler, or no AVX512-BF16)")
    in_features, out_features, bias = shape
    linear = _linear(in_features, out_features, bias=bias, seed=2)
    layer = Bfloat16Linear(linear)
    assert (layer._native is not None) == (kernel == "native")
    rows = _mixed_rows(features=in_features)
    with torch.inference_mode():
        together = layer(rows)
        for i in range(len(rows)):
            assert torch.equal(layer(rows[i:i + 1]), together[i:i + 1]), i
        assert torch.equal(layer(rows.flip(0)), together.flip(0))
        assert torch.equal(layer(rows[5:30]), together[5:30])
        rounded = torch.nn.functional.linear(rows.bfloat16().double(), linear.weight.bfloat16().double(),
                                             None if linear.bias is None else linear.bias.double())
        scale = rows.abs().amax(dim=1, keepdim=True).double() + (1e-30 if linear.bias is None else linear.bias.abs().max().item())
        # float32 sums (oneDNN's output is then rounded to bfloat16: 2^-8 of each output)
        tolerance = 1e-5 if kernel == "native" else 1e-2
        assert ((together.double() - rounded).abs() / scale).max() < tolerance * in_features ** 0.5


def test_native_bfloat16_refuses_weights_packed_for_another_shape():
    """The kernel trusts its shapes (a mismatch would read past the weights): the wrapper checks."""
    from cai.backends import kernels

    if kernels.linear_bf16() is None:
        pytest.skip("cai's bfloat16 kernel is not built here (no compiler, or no AVX512-BF16)")
    packed = kernels.pack_bf16(torch.randn(70, 37))
    with pytest.raises(ValueError, match=r"another shape than \[70, 39\]"):
        kernels.linear_bf16()(torch.randn(3, 39), packed, 70)
    with pytest.raises(ValueError, match="another shape"):
        kernels.linear_bf16()(torch.randn(3, 37), packed, 70, torch.zeros(71))
    assert kernels.linear_bf16()(torch.randn(3, 37), packed, 70, torch.zeros(70)).shape == (3, 70)


# --- Float16WeightLinear ------------------------------------------------------------------------

@needs_fbgemm
def test_float16_weights_are_float32_arithmetic_on_rounded_weights():
    linear = _linear()
    layer = Float16WeightLinear(linear)
    x = torch.randn(37, 48) * torch.logspace(-2, 2, 37).unsqueeze(1)
    with torch.inference_mode():
        got = layer(x)
        assert _rel(got, linear(x)) < 1e-3
        rounded = torch.nn.functional.linear(x, linear.weight.half().float(), linear.bias)
        assert torch.allclose(got, rounded, rtol=1e-5, atol=1e-4), "weights are float16, the sums float32"


@needs_fbgemm
def test_float16_bias_and_shapes():
    with_bias, without = _linear(bias=True, seed=4), _linear(bias=False, seed=4)
    x = torch.randn(2, 7, 48)
    with torch.inference_mode():
        a, b = Float16WeightLinear(with_bias)(x), Float16WeightLinear(without)(x)
        assert a.shape == b.shape == (2, 7, 40)
        assert torch.allclose(a - b, with_bias.bias.expand_as(a), atol=1e-5)
        assert _rel(b, without(x)) < 1e-3
        assert torch.equal(a.reshape(14, 40), Float16WeightLinear(with_bias)(x.reshape(14, 48)))
        assert Float16WeightLinear(with_bias)(x.to(torch.bfloat16)).dtype == torch.bfloat16


# --- convert_linears ----------------------------------------------------------------------------

def _tiny_llama():
    model, _ = _tiny("llama")
    return model


def _linears(model) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


@needs_fbgemm
@pytest.mark.parametrize("mode", ["int8", "float16", pytest.param("bfloat16", marks=needs_bf16)])
def test_convert_linears_replaces_every_linear(mode):
    model = _tiny_llama()
    before = _linears(model)
    assert len(before) == 2 * 7 + 1                    # q k v o gate up down per layer, and lm_head
    ids = torch.tensor([list(range(3, 40))])
    with torch.inference_mode():
        want = model(ids).logits
    assert convert_linears(model, mode) == len(before)
    assert _linears(model) == []
    modules = dict(model.named_modules())
    head = model.get_output_embeddings()
    decoder = {"int8": Int8Linear, "float16": Float16WeightLinear, "bfloat16": Bfloat16Linear}[mode]
    assert type(head) is (Float16WeightLinear if mode == "int8" else decoder) and modules["lm_head"] is head
    for name in before:
        if name != "lm_head":
            assert type(modules[name]) is decoder, name
    assert unsupported_reason(model) is None
    with torch.inference_mode():
        got = model(ids).logits
    assert got.shape == want.shape
    # The tiny model's weights are large (initializer_range 0.3), so errors compound more than in a
    # trained model; float16 weights still stay within float16 rounding, int8 within a few tenths.
    assert _rel(got, want) < {"int8": 0.25, "bfloat16": 0.05, "float16": 5e-3}[mode]
    assert convert_linears(model, mode) == 0, "a converted model has nothing left to convert"


def test_convert_linears_refuses_an_unknown_mode():
    model = _tiny_llama()
    before = _linears(model)
    with pytest.raises(ValueError, match="unknown linear mode 'float8'"):
        convert_linears(model, "float8")
    assert _linears(model) == before, "nothing converted before the refusal"


# --- the engine on a converted model ------------------------------------------------------------

@needs_fbgemm
@pytest.mark.parametrize("mode", ["int8", "float16"])
def test_engine_matches_generate_on_a_converted_model(mode):
    model, reference = _tiny("llama")
    convert_linears(model, mode)
    convert_linears(reference, mode)
    probe = torch.tensor([list(range(5, 30))])
    with torch.inference_mode():
        assert torch.equal(model(probe).logits, reference(probe).logits), "conversion is deterministic"
    rng = random.Random(2)
    root = [rng.randrange(3, VOCAB) for _ in range(30)]
    conversations = {f"c{i}": root + [rng.randrange(3, VOCAB) for _ in range(5 + 4 * i)] for i in range(3)}
    engine = Engine(model, slots=2, stop_ids=[])               # fewer slots than conversations
    for turn in range(2):
        results = _run(engine, conversations, max_new=6)
        for key, tokens in conversations.items():
            assert results[key].tokens == _reference(reference, tokens, 6, []), (mode, key, turn)
            conversations[key] = tokens + results[key].tokens + [rng.randrange(3, VOCAB) for _ in range(3 + turn)]
    assert engine.stats.prefill_reused > 0


# --- --dtype ------------------------------------------------------------------------------------

def test_pick_dtype():
    with pytest.raises(UsageError, match="int8"):
        pick_dtype("int8", "cuda")
    with pytest.raises(UsageError, match="int8"):
        pick_dtype("int8", "mps")
    with pytest.raises(UsageError, match="unknown dtype 'nonsense'"):
        pick_dtype("nonsense", "cpu")
    for requested in ("auto", "float16", "int8", "float32"):
        assert pick_dtype(requested, "cpu") is torch.float32, requested
    assert pick_dtype("float16", "cuda") is torch.float16
    assert pick_dtype("auto", "mps") is torch.float16


def test_pick_dtype_bfloat16_on_a_cpu_needs_bf16_units(monkeypatch):
    monkeypatch.setattr(quant, "cpu_has_bf16", lambda: False)
    with pytest.raises(UsageError, match="bfloat16 on a CPU without bf16 hardware"):   # before any model loads
        pick_dtype("bfloat16", "cpu")
    with pytest.raises(UsageError, match="dtype: bfloat16: this CPU has no bf16 units"):
        linear_mode("bfloat16", "cpu")
    monkeypatch.setattr(quant, "cpu_has_bf16", lambda: True)
    assert pick_dtype("bfloat16", "cpu") is torch.float32        # loaded float32, the linears then converted
    assert linear_mode("bfloat16", "cpu") == "bfloat16"
    assert pick_dtype("bfloat16", "cuda") is torch.bfloat16
    assert linear_mode("bfloat16", "cuda") is None


@needs_fbgemm
def test_linear_mode(monkeypatch):
    assert linear_mode("auto", "cpu") == ("bfloat16" if quant.native_bfloat16() else "float16")
    monkeypatch.setattr(quant, "native_bfloat16", lambda: True)       # AVX512-BF16 and cai's kernels built
    assert linear_mode("auto", "cpu") == "bfloat16"
    assert linear_mode("float16", "cpu") == "float16"
    monkeypatch.setattr(quant, "native_bfloat16", lambda: False)      # an AVX2 CPU, or no compiler
    assert linear_mode("auto", "cpu") == "float16"
    assert linear_mode("float16", "cpu") == "float16"
    assert linear_mode("int8", "cpu") == "int8"
    assert linear_mode("float32", "cpu") is None
    assert linear_mode("auto", "cuda") is None
    assert linear_mode("float16", "cuda") is None
    assert linear_mode("auto", "mps") is None


def test_linear_mode_without_fbgemm(monkeypatch):
    monkeypatch.setattr(quant, "available", lambda mode="float16": "no fbgemm here")
    monkeypatch.setattr(quant, "native_bfloat16", lambda: False)
    assert linear_mode("auto", "cpu") is None                 # auto falls back to float32
    for requested in ("float16", "int8"):
        with pytest.raises(UsageError, match=f"dtype: {requested}: no fbgemm here"):
            linear_mode(requested, "cpu")
    assert linear_mode("float32", "cpu") is None


def test_weights_name():
    assert weights_name("m", "int8") == "m (int8)"
    assert weights_name("m (int8)", "int8") == "m (int8)"
    assert weights_name(weights_name("m", "int8"), "int8") == "m (int8)"
    assert weights_name("m", "bfloat16") == weights_name("m (bfloat16)", "bfloat16") == "m (bfloat16)"
    for dtype in ("auto", "float16", "float32"):
        assert weights_name("m", dtype) == "m", dtype


def test_keep_freed_memory_reports_a_bool():
    import sys

    kept = keep_freed_memory()
    assert isinstance(kept, bool)
    if sys.platform.startswith("linux"):
        import ctypes.util

        if ctypes.util.find_library("c") == "libc.so.6":
            assert kept


# --- HFBackend and the CLI on the tiny chat model -----------------------------------------------

@needs_fbgemm
@pytest.mark.parametrize("dtype, decoder, name", [
    ("int8", Int8Linear, " (int8)"), ("auto", Float16WeightLinear, ""), ("float16", Float16WeightLinear, ""),
    ("float32", torch.nn.Linear, "")])
def test_backend_converts_on_cpu(tiny_model, dtype, decoder, name, monkeypatch):
    monkeypatch.setattr(quant, "native_bfloat16", lambda: False)      # auto as on a CPU without AVX512-BF16
    backend = HFBackend(str(tiny_model), "tiny", HFOptions(device="cpu", dtype=dtype))
    assert backend.model_name == "tiny" + name
    assert backend.dtype is torch.float32
    assert backend.linears == (None if dtype == "float32" else "int8" if dtype == "int8" else "float16")
    head = backend.model.get_output_embeddings()
    assert type(head) is (torch.nn.Linear if dtype == "float32" else Float16WeightLinear)
    proj = backend.model.model.layers[0].self_attn.q_proj
    assert type(proj) is decoder


def test_auto_is_bfloat16_where_cais_kernels_run_and_the_name_says_so_before_loading(tiny_model):
    """auto on a CPU: bfloat16 linears on cai's kernels where they run (AVX512-BF16), float16
    weights elsewhere; the name `resolve` gives before loading (what a resume is checked against)
    is the name the loaded model's records carry."""
    from types import SimpleNamespace

    native = quant.native_bfloat16()
    spec = SimpleNamespace(model=str(tiny_model), device="cpu", dtype="auto")
    _, name = HFBackend.resolve(spec)
    backend = HFBackend(str(tiny_model), name, HFOptions(device="cpu", dtype="auto"))
    assert backend.model_name == name == str(tiny_model) + (" (bfloat16)" if native else "")
    proj = backend.model.model.layers[0].self_attn.q_proj
    if native:
        assert backend.linears == "bfloat16" and type(proj) is Bfloat16Linear and proj._native is not None
    else:
        assert backend.linears in ("float16", None)


@needs_bf16
def test_cli_bfloat16_runs_the_engine_on_the_cpus_bf16_units(tiny_model, tmp_path, monkeypatch):
    """--dtype bfloat16 on a CPU with bf16 units: bf16 linears (the head too), the engine's keys
    and values kept in bfloat16, the records named for it, and a resume in another format refused."""
    from cai.backends import engine as engine_module

    engines = []
    monkeypatch.setattr(engine_module.Engine, "__init__", lambda self, *a, init=engine_module.Engine.__init__, **k:
                        engines.append(self) or init(self, *a, **k))
    out = tmp_path / "pairs.jsonl"
    result = run("generate", EXAMPLES, "--model", tiny_model, "-o", out, "--limit", "3", "--dtype", "bfloat16", *FAST)
    assert result.exit_code == 0, result.output
    records = read_jsonl(out)
    assert len(records) == 3 and all(isinstance(r["chosen"], str) and r["rounds"][0]["revision"] == r["chosen"] for r in records)
    assert all(r["meta"]["model"] == f"{tiny_model} (bfloat16)" for r in records)
    (engine,) = engines
    assert type(engine.runner.model.get_output_embeddings()) is Bfloat16Linear
    assert type(engine.runner.model.model.layers[0].mlp.down_proj) is Bfloat16Linear
    assert engine.cache.root and engine.cache.root[0][0].dtype == torch.bfloat16
    assert engine.cache.keys[0].dtype == torch.bfloat16
    refused = run("generate", EXAMPLES, "--model", tiny_model, "-o", out, "--limit", "4", "--dtype", "float16", *FAST)
    said = " ".join(refused.stderr.split())
    assert refused.exit_code == 2 and "(bfloat16)" in said, refused.output
    assert "it was made with --dtype bfloat16: pass that to continue it" in said    # only the precision changed
    resumed = run("generate", EXAMPLES, "--model", tiny_model, "-o", out, "--limit", "4", "--dtype", "bfloat16", *FAST)
    assert resumed.exit_code == 0 and len(read_jsonl(out)) == 4, resumed.output


def run(*args):
    return CliRunner().invoke(app, plumbing(args))


@needs_fbgemm
def test_cli_int8_names_the_model_and_refuses_resuming_across_dtypes(tiny_model, tmp_path):
    out = tmp_path / "pairs.jsonl"
    result = run("generate", EXAMPLES, "--model", tiny_model, "-o", out, "--limit", "2", "--dtype", "int8", *FAST)
    assert result.exit_code == 0, result.output
    records = read_jsonl(out)
    assert len(records) == 2
    assert all(r["meta"]["model"] == f"{tiny_model} (int8)" for r in records)
    before = out.read_bytes()

    refused = run("generate", EXAMPLES, "--model", tiny_model, "-o", out, "--limit", "3", *FAST)
    assert refused.exit_code == 2, refused.output
    message = " ".join(refused.stderr.split())
    assert "different run" in message and "model:" in message and "(int8)" in message
    assert out.read_bytes() == before, "a refused run must leave the file untouched"

    resumed = run("generate", EXAMPLES, "--model", tiny_model, "-o", out, "--limit", "3", "--dtype", "int8", *FAST)
    assert resumed.exit_code == 0, resumed.output
    assert [r["meta"]["model"] for r in read_jsonl(out)] == [f"{tiny_model} (int8)"] * 3

    judged = tmp_path / "judged.jsonl"
    result = CliRunner().invoke(app, [str(a) for a in ("judge", out, "--model", tiny_model, "-o", judged,
                                                       "--dtype", "int8", "--device", "cpu")])
    assert result.exit_code == 0, result.output
    assert all(r["judge"]["model"] == f"{tiny_model} (int8)" for r in read_jsonl(judged))


@pytest.mark.parametrize("command", ["generate", "judge"])
def test_cli_unknown_dtype_is_a_one_line_error(tiny_model, tmp_path, command):
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": "p1", "prompt": "hi", "chosen": "a", "rejected": "b"}\n')
    extra = ["--constitution", "harmless"] if command == "judge" else []
    target = EXAMPLES if command == "generate" else source
    result = run(command, target, "--model", tiny_model, "-o", tmp_path / "out.jsonl", *extra, "--dtype", "nonsense")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "--dtype" in lines[0] and "nonsense" in lines[0]
    assert not (tmp_path / "out.jsonl").exists()
