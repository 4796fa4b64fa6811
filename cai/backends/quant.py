"""How a CPU multiplies by the weights: fbgemm's reduced-precision linear layers.

On a CPU without bf16 or int8 dot-product units, a transformers model in float32 spends most of a
decode step in skinny float32 GEMMs, which MKL runs at a fraction of the machine's speed when a
step has only a few rows (here 25-40 GFLOP/s for 1-4 rows against 140 for 128). fbgemm, which
ships inside PyTorch, has kernels made for that shape:

* `float16` (the CPU default without AVX512-BF16): weights stored in float16 and widened to float32 inside the kernel;
  activations and sums stay float32. Half the weight bytes to stream, 2-8× faster for a few rows,
  and the same model to within float16 rounding of the weights (loss on held-out text changes in
  the fifth digit; see docs/speed.md).
* `int8`: the decoder's linears in 8-bit integers. Each weight row (output channel) has its own
  scale; each input row (token) is scaled to max |x| = 1 and quantized with one fixed scale, so
  integer sums are exact and a linear layer's output for a token does not depend on which other
  tokens share the batch. About twice float32's speed at every batch size; a few percent higher
  loss. The output projection stays float16 weights: it decides which token is picked.
  Rounding to 8 bits turns last-bit differences elsewhere into visibly different activations:
  the engine's records do not depend on batching (its attention gives an id the same bits
  whatever shares its forward, tests/test_invariance.py), but they differ from plain
  `generate`'s, whose attention sums in another order (bench/throughput.py finds 1 of 16
  records identical between the engine and the one-at-a-time loop; 16 of 16 with float16
  weights).

On a CPU that has bf16 units (AMX or AVX512-BF16, as oneDNN reports them), a third mode:

* `bfloat16`: the linears' weights in bfloat16, their products on those units: the input is
  rounded to bfloat16, sums are float32. Where cai's own kernel builds (AVX512-BF16 and a C
  compiler; cai/backends/linear_bf16.c) it runs them, with float32 output, at the machine's
  bf16 peak; `auto` then picks this mode (it is the CPU's fastest: about 1.7× float16 weights'
  speed on a 2-core AVX512-BF16 EPYC, docs/speed.md). Elsewhere oneDNN runs them in tiles of
  one fixed size (`Bfloat16Linear`). Either way a row's result does not depend on the rows
  beside it, and records do not depend on batching (tests/test_invariance.py). Norms and the
  residual stream stay float32; the engine keeps its keys and values in bfloat16 beside this
  mode, and its attention takes bf16 products there too. bench/precision.py for what it costs
  in loss (nothing measurable with cai's kernel on SmolLM2-135M)."""


from __future__ import annotations

import warnings

import torch

LINEAR_MODES = ("float16", "int8", "bfloat16")

# fbgemm's AVX2 kernel sums pairs of u8 × s8 products in 16 bits; 7-bit activations keep those
# sums exact (`reduce_range`).
REDUCE_RANGE = True


def available(mode: str = "float16") -> str | None:
    """None when this PyTorch and CPU can run `mode`'s kernels, else why not."""
    if mode == "bfloat16":
        return None if cpu_has_bf16() else "this CPU has no bf16 units (AMX or AVX512-BF16) that oneDNN uses"
    engines = torch.backends.quantized.supported_engines
    if not any(e in engines for e in ("x86", "fbgemm")):
        return f"this PyTorch has no x86/fbgemm quantized engine (it has {', '.join(engines) or 'none'})"
    return None


class Float16WeightLinear(torch.nn.Module):
    """A `torch.nn.Linear` whose weights are kept in float16 and multiplied in float32 by fbgemm."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        bias = None if linear.bias is None else linear.bias.detach().float()
        self._packed = torch.ops.quantized.linear_prepack_fp16(linear.weight.detach().float(), bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.quantized.linear_dynamic_fp16(x.reshape(-1, self.in_features).float(), self._packed)
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=float16"


def native_bfloat16() -> bool:
    """Whether cai's own bfloat16 kernels run here (cai/backends/linear_bf16.c: a CPU with
    AVX512-BF16 and a C compiler), the ones that make bfloat16 the CPU's fastest mode with records
    that do not depend on batching."""
    from cai.backends import kernels

    return kernels.linear_bf16() is not None


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX), as oneDNN sees it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class Bfloat16Linear(torch.nn.Module):
    """A `torch.nn.Linear` whose weights are kept in bfloat16 and multiplied on the CPU's bf16
    units, with a row's result the same bits whatever rows share the product.

    Where cai's native kernel builds (AVX512-BF16, cai/backends/linear_bf16.c), it runs the
    product: the input rounded to bfloat16, every output summed in float32 in one fixed order,
    the output float32. Elsewhere (no compiler, `CAI_NO_KERNELS`) oneDNN runs it; oneDNN picks its
    kernel, and with it the order of a row's sums, by the shape of the product, so one call over
    all rows would give a row other bits beside other rows (on a 2-core AVX512-BF16 EPYC, rows of
    the [1536 → 576] product differ in the last bit between 1 and 2-400 rows). The rows go
    instead in tiles of exactly TILE, the last one padded with zeros: every product has one
    shape, and a row's result is the same wherever it sits and whatever shares its tile (its
    output rounded to bfloat16). The two give a row slightly different bits: a run and its
    resume must use the same one, as they use the same attention."""

    TILE = 64          # 32 ran the 64-prompt bench about 4% slower here; any fixed size keeps the bits

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        from cai.backends import kernels

        self._native = kernels.linear_bf16()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if self._native is not None:
            self.register_buffer("_packed", kernels.pack_bf16(linear.weight), persistent=False)
            self.bias = None if linear.bias is None else torch.nn.Parameter(
                linear.bias.detach().float().contiguous(), requires_grad=False)
            return
        self.weight = torch.nn.Parameter(linear.weight.detach().to(torch.bfloat16), requires_grad=False)
        self.bias = None if linear.bias is None else torch.nn.Parameter(
            linear.bias.detach().to(torch.bfloat16), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._native is not None:
            out = self._native(x.reshape(-1, self.in_features), self._packed, self.out_features, self.bias)
            return out.view(*x.shape[:-1], self.out_features).to(x.dtype)
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        n, tile = rows.shape[0], self.TILE
        if n % tile:
            rows = torch.cat([rows, rows.new_zeros(tile - n % tile, self.in_features)])
        out = torch.cat([torch.nn.functional.linear(part, self.weight, self.bias) for part in rows.split(tile)])
        return out[:n].view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        kernel = "cai's native kernel" if self._native is not None else "oneDNN in tiles"
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=bfloat16 ({kernel})"


class Int8Linear(torch.nn.Module):
    """A `torch.nn.Linear` with int8 weights (one scale per output channel) and int8 activations
    (one scale per row), computed by fbgemm."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scales = (weight.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny).double()
        zero = torch.zeros(weight.shape[0], dtype=torch.long)
        with warnings.catch_warnings():
            # PyTorch marks its quantized tensor type deprecated; fbgemm's packed int8 linear (the
            # kernel used here) still takes its weights in that form.
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            quantized = torch.quantize_per_channel(weight, scales, zero, 0, torch.qint8)
        self._packed = torch.ops.quantized.linear_prepack(quantized, None)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # fbgemm picks each batch's quantization from its min and max; this row pins them to -1
        # and 1, so every row is quantized alike, whatever else is in the batch.
        calibration = torch.zeros(1, self.in_features)
        calibration[0, 0], calibration[0, -1] = 1.0, -1.0
        self.register_buffer("_calibration", calibration, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        unit = torch.cat([rows / scale, self._calibration])
        out = torch.ops.quantized.linear_dynamic(unit, self._packed, REDUCE_RANGE)[:-1].mul_(scale)
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def convert_linears(model, mode: str) -> int:
    """Replaces the model's linear layers for `mode` (LINEAR_MODES); returns how many."""
    if mode not in LINEAR_MODES:
        raise ValueError(f"unknown linear mode '{mode}'")
    decoder_kind = {"int8": Int8Linear, "float16": Float16WeightLinear, "bfloat16": Bfloat16Linear}[mode]
    replaced = 0
    head = model.get_output_embeddings()
    if type(head) is torch.nn.Linear:       # int8 keeps the output projection in float16: it picks the token
        model.set_output_embeddings((Float16WeightLinear if mode == "int8" else decoder_kind)(head))
        replaced += 1
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, decoder_kind(child))
                replaced += 1
    return replaced
