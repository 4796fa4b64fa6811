"""The native decode-attention kernel (cai/backends/decode_attention.c): built on first use where
there is a C compiler, and the same attention as PyTorch's to float rounding."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from cai.backends import kernels
from cai.backends.engine import _plain_part

needs_compiler = pytest.mark.skipif(kernels._compiler() is None or os.environ.get(kernels.DISABLE, "") not in ("", "0"),
                                    reason="no C compiler here (or CAI_NO_KERNELS is set)")


def _reference(q, keys, values, slots, positions, start):
    """Plain float64 attention of each row's queries over positions start..positions[b, i % q_len]."""
    batch, heads, m, dim = q.shape
    q_len = positions.shape[1]
    last = int(positions.max()) + 1
    k = keys[slots][:, :, start:last].double()
    v = values[slots][:, :, start:last].double()
    limits = positions[:, torch.arange(m) % q_len]                                     # [batch, m]
    allowed = torch.arange(start, last)[None, None, :] <= limits[:, :, None]           # [batch, m, kv]
    mask = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill_(~allowed, float("-inf"))[:, None]
    return _plain_part(q.double(), k, v, mask, dim ** -0.5)


@needs_compiler
@pytest.mark.parametrize("dim", [64, 128, 16, 40])
@pytest.mark.parametrize("q_len", [1, 3, 9])
def test_kernel_matches_plain_attention(dim, q_len):
    native = kernels.decode_attention()
    assert native is not None, "a C compiler is here but the kernel was not built"
    gen = torch.Generator().manual_seed(dim * 10 + q_len)
    slots_total, heads, group, capacity, start = 7, 3, 3, 320, 40
    keys = torch.randn(slots_total, heads, capacity, dim, generator=gen)
    values = torch.randn(slots_total, heads, capacity, dim, generator=gen)
    slots = torch.tensor([5, 0, 3, 6, 2])
    lengths = torch.tensor([1, 37, 200, 64, 250])        # own positions of each row, drafts included
    positions = start + lengths[:, None] - q_len + torch.arange(q_len)[None, :]
    positions = positions.clamp(min=start)
    q = torch.randn(len(slots), heads, group * q_len, dim, generator=gen) * 2
    out, lse = native(q, keys, values, slots, positions, start, dim ** -0.5)
    ref, ref_lse = _reference(q, keys, values, slots, positions, start)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=1e-5)


@needs_compiler
def test_kernel_is_cached_and_reused(tmp_path):
    """A second process finds the built library in the cache instead of compiling again."""
    env = {**os.environ, "CAI_CACHE_DIR": str(tmp_path)}
    code = "from cai.backends import kernels; assert kernels.decode_attention() is not None"
    for _ in range(2):
        subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)
    built = list((tmp_path / "kernels").glob("decode_attention-*.so"))
    assert len(built) == 1
    assert not list((tmp_path / "kernels").glob("*.partial"))


def test_kernel_can_be_turned_off_and_a_missing_compiler_is_not_an_error(tmp_path):
    code = "from cai.backends import kernels; print(kernels.decode_attention())"
    for extra in ({kernels.DISABLE: "1"}, {"CC": str(tmp_path / "no-such-cc")}):
        env = {**os.environ, "CAI_CACHE_DIR": str(tmp_path), **extra}
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "None"


def test_a_compile_error_falls_back_to_pytorch(tmp_path, monkeypatch):
    """A compiler that fails leaves the engine on PyTorch's kernels, with the reason logged."""
    if shutil.which("false") is None:
        pytest.skip("no `false` here")
    monkeypatch.setenv("CAI_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", shutil.which("false"))
    monkeypatch.delenv(kernels.DISABLE, raising=False)
    monkeypatch.setattr(kernels, "_loaded", {})
    assert kernels.decode_attention() is None
