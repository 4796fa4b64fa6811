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

needs_compiler = pytest.mark.skipif(kernels._compiler() is None or os.environ.get(kernels.DISABLE, "") not in ("", "0"),
                                    reason="no C compiler here (or CAI_NO_KERNELS is set)")


def _reference(q, keys, values, slots, offsets, positions, start):
    """Plain float64 softmax attention, one id at a time: id t of row b, in every query head,
    over positions start..positions[t] of slot slots[b]."""
    heads, group, n_ids, dim = q.shape
    out = torch.zeros(heads, group, n_ids, dim, dtype=torch.float64)
    lse = torch.zeros(heads, group, n_ids, dtype=torch.float64)
    for b in range(len(slots)):
        for t in range(int(offsets[b]), int(offsets[b + 1])):
            k = keys[slots[b], :, start:int(positions[t]) + 1].double()            # [heads, n, dim]
            v = values[slots[b], :, start:int(positions[t]) + 1].double()
            scores = torch.einsum("hgd,hnd->hgn", q[:, :, t].double(), k) * dim ** -0.5
            lse[:, :, t] = torch.logsumexp(scores, dim=-1)
            out[:, :, t] = torch.einsum("hgn,hnd->hgd", torch.softmax(scores, dim=-1), v)
    return out, lse


@needs_compiler
@pytest.mark.parametrize("dim", [64, 128, 16, 40])
@pytest.mark.parametrize("counts", [(1, 1, 1, 1, 1), (1, 3, 9, 2, 16)])
def test_kernel_matches_plain_attention(dim, counts):
    """Rows of different lengths and different numbers of ids (a decode step with drafts), slots
    out of order, GQA groups of 3, head sizes on and off the vectorized paths."""
    native = kernels.decode_attention()
    assert native is not None, "a C compiler is here but the kernel was not built"
    gen = torch.Generator().manual_seed(dim * 10 + sum(counts))
    slots_total, heads, group, capacity, start = 7, 3, 3, 320, 40
    keys = torch.randn(slots_total, heads, capacity, dim, generator=gen)
    values = torch.randn(slots_total, heads, capacity, dim, generator=gen)
    slots = torch.tensor([5, 0, 3, 6, 2])
    lengths = [20, 37, 200, 64, 250]                   # own positions of each row before this step
    positions = torch.tensor([start + n + j for n, c in zip(lengths, counts) for j in range(c)])
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
    q = torch.randn(heads, group, len(positions), dim, generator=gen) * 2
    out, lse = native(q, keys, values, slots, offsets, positions, start, dim ** -0.5)
    ref, ref_lse = _reference(q, keys, values, slots, offsets, positions, start)
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


@needs_compiler
def test_each_cpu_gets_its_own_build(tmp_path, monkeypatch):
    """`-march=native` code is only safe on the CPU that built it: a cache folder shared by machines
    with other CPUs (a home on NFS) must hold one build per CPU, never hand one CPU another's."""
    monkeypatch.setenv("CAI_CACHE_DIR", str(tmp_path))
    compiler = kernels._compiler()
    here = kernels._build(compiler)
    assert kernels._build(compiler) == here                    # the same CPU: the cached build
    monkeypatch.setattr(kernels, "_cpu", lambda: "x86_64 some other CPU flags : fpu sse2")
    other = kernels._build(compiler)
    assert other != here and other.exists() and here.exists()
