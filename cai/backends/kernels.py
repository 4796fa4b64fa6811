"""Native CPU kernels, compiled on first use with the machine's C compiler.

`decode_attention.c` and `linear_bf16.c` (next to this file) are built once per machine, into one
library, in the cache
(`cai.model_files.cache_dir()/kernels`, keyed by the source, the flags, the compiler and the CPU) and
loaded with ctypes. `-march=native` is safe because the build runs where it is used, and a cache
folder shared by machines with other CPUs (a home on NFS) holds one build each; the source stays a
plain C file, so the package needs no build step and no compiler to install. With no compiler,
a failed build or `CAI_NO_KERNELS=1`, `decode_attention()` and `linear_bf16()` return None and the
engine uses PyTorch's kernels instead (same results to float rounding, slower)."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger("cai")

SOURCES = tuple(Path(__file__).with_name(name) for name in ("decode_attention.c", "linear_bf16.c", "rotary.c"))
# Not -ffast-math: an id's bits must be the same whichever of the kernel's paths computes it, so
# the compiler may neither reorder a sum (-fassociative-math) nor fuse a product into an add the
# source did not write (-ffp-contract). What is kept of it changes no finite, nonzero value.
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-ffinite-math-only", "-fno-signed-zeros",
         "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
DISABLE = "CAI_NO_KERNELS"

_lock = threading.Lock()
_loaded: dict[str, object] = {}


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _cpu() -> str:
    """What `-march=native` depends on: the architecture and the CPU's feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags.strip()}"


def _build(compiler: str) -> Path:
    """The shared library for this source, flags and compiler: from the cache, else compiled
    into it (written under a temporary name and renamed, so concurrent runs never load half a file)."""
    from cai.model_files import cache_dir

    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    texts = [source.read_text() for source in SOURCES]
    key = hashlib.sha256("\0".join([*texts, *FLAGS, version, _cpu()]).encode()).hexdigest()[:16]
    for folder in (cache_dir() / "kernels", Path(tempfile.gettempdir()) / f"cai-kernels-{os.getuid()}"):
        target = folder / f"kernels-{key}.so"
        if target.exists():
            return target
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, partial = tempfile.mkstemp(dir=folder, suffix=".so.partial")
            os.close(fd)
        except OSError:
            continue                           # not writable: try the next place
        try:
            result = subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", partial, "-lm"],
                                    capture_output=True, text=True, timeout=300)
            if result.returncode != 0:
                raise RuntimeError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else
                                   f"{compiler} exited with {result.returncode}")
            os.replace(partial, target)
            return target
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    raise RuntimeError("no writable cache folder for the compiled kernel")


def _library():
    """The loaded kernel library, or None (and why, logged once)."""
    with _lock:
        if "lib" in _loaded:
            return _loaded["lib"]
        lib = None
        compiler = _compiler()
        if os.environ.get(DISABLE, "") not in ("", "0"):
            reason = f"{DISABLE} is set"
        elif compiler is None:
            reason = "no C compiler found (cc, gcc or $CC)"
        else:
            try:
                lib = ctypes.CDLL(str(_build(compiler)))
                for function in (lib.cai_decode_attention, lib.cai_decode_attention_bf16):
                    function.restype = None
                    function.argtypes = ([ctypes.c_void_p] * 7 + [ctypes.c_int64] * 7
                                         + [ctypes.c_float] + [ctypes.c_void_p] * 4 + [ctypes.c_int])
                lib.cai_linear_bf16_supported.restype = ctypes.c_int
                lib.cai_linear_bf16_supported.argtypes = []
                lib.cai_linear_bf16.restype = None
                lib.cai_linear_bf16.argtypes = ([ctypes.c_void_p, *[ctypes.c_int64] * 3, ctypes.c_void_p, ctypes.c_float,
                                                 ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                                 ctypes.c_int64, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p,
                                                 ctypes.c_void_p, ctypes.c_int])
                lib.cai_rotary_write.restype = ctypes.c_int
                lib.cai_rotary_write.argtypes = ([ctypes.c_void_p] + [ctypes.c_int64] * 8 + [ctypes.c_void_p] * 2
                                                 + [ctypes.c_int64] + [ctypes.c_void_p] * 3 + [ctypes.c_int] * 2)
                reason = None
            except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as exc:
                lib, reason = None, f"could not build {', '.join(s.name for s in SOURCES)}: {exc}"
        if reason:
            log.info("native kernels off (%s); using PyTorch's", reason)
        _loaded["lib"] = lib
        return lib


# what the kernel reads keys and values in
KV_DTYPES = (torch.float32, torch.bfloat16)


def decode_attention():
    """The native decode-attention function, or None where it cannot be had."""
    lib = _library()
    return None if lib is None else _call


def _call(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
          offsets: torch.Tensor, positions: torch.Tensor, start: int, scale: float,
          init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of packed queries over each row's own cached positions.

    queries [heads, group, tokens, dim] (any strides; read where they lie): the ids of all rows in one sequence, row b's at
    offsets[b] .. offsets[b+1]-1; id t sees positions start .. positions[t] of slot slots[b] in
    `keys`/`values` [slots, heads, capacity, dim] (float32 or bfloat16, CPU, contiguous; queries
    float32). `init`: another part's (out, lse) for the same queries (the root's), which the
    result is joined with. Returns (out [heads, group, tokens, dim], lse [heads, group, tokens]);
    out is a view of token-major memory [tokens, heads, group, dim], the layout the output
    projection reads, so `out.reshape(heads * group, tokens, dim).transpose(0, 1)` copies nothing.
    Ids of rows past `slots` are left unwritten."""
    lib = _loaded["lib"]
    if queries.stride(-1) != 1:
        queries = queries.contiguous()
    slots, offsets, positions = (t.to(torch.int64).contiguous() for t in (slots, offsets, positions))
    if keys.dtype not in KV_DTYPES or values.dtype != keys.dtype or queries.dtype != torch.float32 \
            or not keys.is_contiguous() or not values.is_contiguous():
        raise ValueError("decode_attention needs float32 queries and contiguous float32 or bfloat16 keys and values")
    heads, group, tokens, dim = queries.shape
    strides = torch.tensor(queries.stride()[:3], dtype=torch.int64)
    out = torch.empty((tokens, heads, group, dim), dtype=torch.float32)
    lse = torch.empty((heads, group, tokens), dtype=torch.float32)
    init_out = init_lse = None
    if init is not None:
        if init[0].shape != queries.shape or init[1].shape != lse.shape:
            raise ValueError("decode_attention: init must match the queries' layout")
        # out's token-major memory: for a result of this function, the view it came from
        init_out = init[0].to(torch.float32).permute(2, 0, 1, 3).contiguous()
        init_lse = init[1].to(torch.float32).contiguous()
    function = lib.cai_decode_attention_bf16 if keys.dtype == torch.bfloat16 else lib.cai_decode_attention
    function(queries.data_ptr(), strides.data_ptr(), keys.data_ptr(), values.data_ptr(), slots.data_ptr(), offsets.data_ptr(),
             positions.data_ptr(), start, slots.shape[0], heads, group, tokens, dim, keys.shape[2], scale,
             None if init_out is None else init_out.data_ptr(), None if init_lse is None else init_lse.data_ptr(),
             out.data_ptr(), lse.data_ptr(), torch.get_num_threads())
    return out.permute(1, 2, 0, 3), lse


def linear_bf16():
    """The native bfloat16 linear (`_linear`), or None where it cannot be had (no library, or a
    CPU without AVX512-BF16)."""
    lib = _library()
    return None if lib is None or not lib.cai_linear_bf16_supported() else _linear


def pack_bf16(weight: torch.Tensor) -> torch.Tensor:
    """A linear layer's weight [out, in] as the native kernel reads it: bfloat16, in panels of
    PANEL outputs, [out / PANEL][in / 2][PANEL][2], padded with zeros (see linear_bf16.c)."""
    panel = _loaded["lib"].cai_linear_bf16_supported()
    out_features, in_features = weight.shape
    rows, cols = -(-out_features // panel) * panel, -(-in_features // 2) * 2
    padded = torch.zeros(rows, cols, dtype=torch.bfloat16)
    padded[:out_features, :in_features] = weight.detach().to(torch.bfloat16)
    return padded.view(rows // panel, panel, cols // 2, 2).permute(0, 2, 1, 3).contiguous()


def _linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None,
            norm: torch.Tensor | None = None, eps: float = 0.0, add_to: torch.Tensor | None = None,
            gated: bool = False) -> torch.Tensor:
    """x [rows, in] float32 times a `pack_bf16` weight, plus bias (float32): [rows, out] float32.
    Each output is summed in one fixed order, so a row's result is the same bits whatever rows
    share the call.

    `norm` (weights [in], and `eps`): x is RMS-normalized on its way in (a decoder layer's norm
    before its projections; the normalized rows are never stored). `add_to` [rows, out]: the
    product is added to it, in place, and it is returned (a residual stream). `gated`: `packed`
    is a gate's weights then an up projection's, `pack_bf16` of each joined along the outputs
    (`out_features` each); the result is silu(gate) * up, [rows, out_features]."""
    lib = _loaded["lib"]
    if x.dtype != torch.float32 or x.dim() != 2 or x.stride(1) != 1:
        x = x.float().contiguous().view(-1, x.shape[-1])
    rows, in_features = x.shape
    panel = packed.shape[2]
    width = -(-out_features // panel) * panel                 # the outputs' panels, padded
    n = 2 * width if gated else out_features
    if packed.shape != (-(-n // panel), (in_features + 1) // 2, panel, 2) or packed.dtype != torch.bfloat16 \
            or (bias is not None and (bias.shape != (n,) or bias.dtype != torch.float32)) \
            or (norm is not None and (norm.shape != (in_features,) or norm.dtype != torch.float32)):
        raise ValueError(f"linear_bf16: weights packed for another shape than [{out_features}, {in_features}]")
    if add_to is not None:
        if add_to.shape != (rows, out_features) or add_to.dtype != torch.float32 or add_to.stride(1) != 1 or gated:
            raise ValueError("linear_bf16: add_to must be float32 [rows, out_features], rows in place")
        out = add_to
    else:
        out = torch.empty(rows, out_features, dtype=torch.float32)
    tmp = torch.empty(rows, n, dtype=torch.float32) if gated else None
    scratch = torch.empty(rows * ((in_features + 1) // 2), dtype=torch.int32)
    lib.cai_linear_bf16(x.data_ptr(), rows, in_features, x.stride(0), None if norm is None else norm.data_ptr(), eps,
                        packed.data_ptr(), n, None if bias is None else bias.data_ptr(), out.data_ptr(), out.stride(0),
                        2 if gated else 1 if add_to is not None else 0, out_features,
                        None if tmp is None else tmp.data_ptr(), scratch.data_ptr(), torch.get_num_threads())
    return out


def rotary_write(qkv: torch.Tensor, at: tuple[int, int, int], heads: tuple[int, int], dim: int,
                 cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 rows: torch.Tensor) -> None:
    """A q/k/v projection's output `qkv` [ids, …] float32 (queries, keys, values at columns `at`,
    `heads` = (query heads, kv heads) of `dim`): the queries rotated in place, the keys rotated
    and the values as they are written to a layer's cache `keys`/`values` (contiguous, float32 or
    bfloat16, seen as rows of `dim`) at `rows` [kv heads × ids]. `cos`/`sin` [ids, dim]: the
    model's rotary embedding. See rotary.c."""
    lib = _loaded["lib"]
    ids = qkv.shape[0]
    if qkv.dtype != torch.float32 or qkv.stride(1) != 1 or cos.dtype != torch.float32 or cos.stride(1) != 1 \
            or sin.stride() != cos.stride() or sin.dtype != torch.float32 or keys.dtype != values.dtype \
            or keys.dtype not in KV_DTYPES or not keys.is_contiguous() or not values.is_contiguous() \
            or rows.dtype != torch.int64 or rows.shape != (heads[1] * ids,) or not rows.is_contiguous():
        raise ValueError("rotary_write: float32 rows of q/k/v and cos/sin, a contiguous float32 or bfloat16 cache")
    if lib.cai_rotary_write(qkv.data_ptr(), ids, qkv.stride(0), *at, *heads, dim, cos.data_ptr(), sin.data_ptr(),
                            cos.stride(0), keys.data_ptr(), values.data_ptr(), rows.data_ptr(),
                            int(keys.dtype == torch.bfloat16), torch.get_num_threads()) != 0:
        raise ValueError(f"rotary_write: head size {dim} is not one the kernel takes")
