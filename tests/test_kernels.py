"""The native decode-attention kernel (cai/backends/decode_attention.c): built on first use where
there is a C compiler, and the same attention as PyTorch's to float rounding."""

from __future__ import annotations

import os
import shutil
import subprocess

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
def test_kernel_reads_bfloat16_keys_and_values():
    """Keys and values kept in bfloat16: the same attention as over their float32 values, to
    bfloat16's rounding (on a CPU with AVX512-BF16 the products are bf16 ones: the query and the
    softmax weights rounded to bfloat16, sums float32)."""
    native = kernels.decode_attention()
    gen = torch.Generator().manual_seed(3)
    heads, capacity = 3, 200
    # on and off the vectorized paths; a group of 6 gives a task more queries than one pass takes
    for dim, group in ((64, 3), (128, 3), (40, 3), (64, 6)):
        keys = torch.randn(5, heads, capacity, dim, generator=gen).bfloat16()
        values = torch.randn(5, heads, capacity, dim, generator=gen).bfloat16()
        slots, counts, lengths = torch.tensor([4, 1, 2]), [1, 5, 30], [150, 37, 100]
        positions = torch.tensor([10 + n + j for n, c in zip(lengths, counts) for j in range(c)])
        offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
        q = torch.randn(heads, group, len(positions), dim, generator=gen)
        out, lse = native(q, keys, values, slots, offsets, positions, 10, dim ** -0.5)
        ref, ref_lse = _reference(q.bfloat16().float(), keys.float(), values.float(), slots, offsets, positions, 10)
        torch.testing.assert_close(out.double(), ref, atol=5e-3, rtol=1e-2)
        torch.testing.assert_close(lse.double(), ref_lse, atol=5e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        native(q, keys.half(), values.half(), slots, offsets, positions, 10, dim ** -0.5)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("slots", [[3, 0, 2], [1, 1, 1]], ids=["own-slots", "one-shared-slot"])
@pytest.mark.parametrize("group,dim", [(3, 64), (8, 128), (5, 96)])
def test_an_ids_result_is_the_same_bits_alone_and_beside_other_ids(dtype, slots, group, dim):
    """A query's result does not depend on which ids share its call: alone, as one of a row's
    many ids (a prefill), beside other rows, in another place of the call (greedy records depend
    on it; tests/test_invariance.py runs it end to end). Rows reading one slot (the shared root)
    share the kernel's tasks: each id still sees its own positions only, with the same bits.
    With bfloat16 on AVX512-BF16, a task of a few queries (an id alone: `group` of them) puts keys
    in the vector lanes and a larger one queries: both give a query the same bits (groups and
    head sizes on both sides of the switch, and of the value pass's widths)."""
    native = kernels.decode_attention()
    gen = torch.Generator().manual_seed(11)
    heads, capacity, start = 3, 300, 5
    keys = torch.randn(4, heads, capacity, dim, generator=gen).to(dtype)
    values = torch.randn(4, heads, capacity, dim, generator=gen).to(dtype)
    slots, counts, lengths = torch.tensor(slots), [1, 40, 7], [200, 60, 31]
    positions = torch.tensor([start + n + j for n, c in zip(lengths, counts) for j in range(c)])
    offsets = [0, *torch.tensor(counts).cumsum(0).tolist()]
    q = torch.randn(heads, group, len(positions), dim, generator=gen)
    init = (torch.randn(heads, group, len(positions), dim, generator=gen), torch.randn(heads, group, len(positions), generator=gen))
    token_major = q.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)      # the projection's layout, read in place
    for part in (None, init):
        out, lse = native(q, keys, values, slots, torch.tensor(offsets), positions, start, dim ** -0.5, part)
        strided = native(token_major, keys, values, slots, torch.tensor(offsets), positions, start, dim ** -0.5, part)
        assert torch.equal(strided[0], out) and torch.equal(strided[1], lse)
        # out lies token-major: back to [tokens, heads * dim] without a copy
        assert out.reshape(heads * group, len(positions), dim).transpose(0, 1).is_contiguous()
        for b in range(len(counts)):
            for t in range(offsets[b], offsets[b + 1]):
                alone = native(q[:, :, t:t + 1], keys, values, slots[b:b + 1], torch.tensor([0, 1]), positions[t:t + 1],
                               start, dim ** -0.5, None if part is None else (part[0][:, :, t:t + 1], part[1][:, :, t:t + 1]))
                assert torch.equal(alone[0][:, :, 0], out[:, :, t]) and torch.equal(alone[1][:, :, 0], lse[:, :, t]), (b, t)


@needs_compiler
def test_kernel_starts_from_another_parts_softmax():
    """`init`: another part's (out, lse) over other keys (the root's); the result is attention over
    both parts' keys under one softmax. A query whose other part saw no key (lse far below
    anything real) gets its own part alone."""
    native = kernels.decode_attention()
    gen = torch.Generator().manual_seed(7)
    heads, group, dim, capacity, extra = 3, 3, 64, 96, 50
    keys = torch.randn(4, heads, capacity, dim, generator=gen)
    values = torch.randn(4, heads, capacity, dim, generator=gen)
    other_k = torch.randn(heads, extra, dim, generator=gen)
    other_v = torch.randn(heads, extra, dim, generator=gen)
    slots, counts, lengths = torch.tensor([2, 0, 3]), [1, 4, 2], [10, 60, 33]
    positions = torch.tensor([n + j for n, c in zip(lengths, counts) for j in range(c)])
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
    q = torch.randn(heads, group, len(positions), dim, generator=gen)
    scale = dim ** -0.5
    scores = torch.einsum("hgtd,hnd->hgtn", q.double(), other_k.double()) * scale
    init = (torch.einsum("hgtn,hnd->hgtd", torch.softmax(scores, -1), other_v.double()).float(),
            torch.logsumexp(scores, -1).float())
    init[1][:, :, 0] = torch.finfo(torch.float32).min / 2          # id 0 saw none of the other keys
    out, lse = native(q, keys, values, slots, offsets, positions, 0, scale, init)
    for b in range(len(counts)):
        for t in range(int(offsets[b]), int(offsets[b + 1])):
            own_k, own_v = keys[slots[b], :, :positions[t] + 1].double(), values[slots[b], :, :positions[t] + 1].double()
            both_k = own_k if t == 0 else torch.cat([other_k.double(), own_k], 1)
            both_v = own_v if t == 0 else torch.cat([other_v.double(), own_v], 1)
            s = torch.einsum("hgd,hnd->hgn", q[:, :, t].double(), both_k) * scale
            want = torch.einsum("hgn,hnd->hgd", torch.softmax(s, -1), both_v)
            torch.testing.assert_close(out[:, :, t].double(), want, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(lse[:, :, t].double(), torch.logsumexp(s, -1), atol=2e-5, rtol=1e-5)


@needs_compiler
def test_kernel_is_cached_and_reused(tmp_path, monkeypatch):
    """A later process (here: the loaded library forgotten, as a new process starts without it)
    finds the built library in the cache instead of compiling again."""
    monkeypatch.setenv("CAI_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(kernels.DISABLE, raising=False)
    compiles = []
    run = subprocess.run

    def counting(command, *args, **kwargs):
        compiles.extend([command] if "-o" in command else [])
        return run(command, *args, **kwargs)

    monkeypatch.setattr(kernels.subprocess, "run", counting)
    for _ in range(2):
        monkeypatch.setattr(kernels, "_loaded", {})
        assert kernels.decode_attention() is not None
    assert len(compiles) == 1, "the second load compiled again"
    built = list((tmp_path / "kernels").glob("kernels-*.so"))
    assert len(built) == 1
    assert not list((tmp_path / "kernels").glob("*.partial"))


def test_kernel_can_be_turned_off_and_a_missing_compiler_is_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CAI_CACHE_DIR", str(tmp_path))
    for extra in ({kernels.DISABLE: "1"}, {"CC": str(tmp_path / "no-such-cc")}):
        monkeypatch.delenv(kernels.DISABLE, raising=False)
        for name, value in extra.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(kernels, "_loaded", {})
        assert kernels.decode_attention() is None


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
