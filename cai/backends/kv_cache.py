"""The engine's static per-slot KV cache: each conversation in flight owns one slot (a row of
[slots, kv_heads, capacity, head_dim] tensors per layer); new keys and values are written in
place, so no step ever copies the cache the way a growing `torch.cat` cache does. This file is the
storage alone: what one forward reads and writes where (which slots, positions, masks) is that
step's metadata (step_metadata.py), which the model's forward sees as its cache object."""

from __future__ import annotations

import math
import mmap

import torch


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor. On a CPU its memory is an anonymous mapping, which the kernel backs with real
    pages only where something is written: a cache sized for the longest conversation the run
    could hold costs the memory of the positions its conversations reach, not of its capacity
    (reading an untouched position gives 0.0, as torch.zeros would)."""
    if torch.device(device).type != "cpu" or not math.prod(shape):
        return torch.zeros(shape, dtype=dtype, device=device)
    size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer(mmap.mmap(-1, size), dtype=dtype).view(shape)   # the tensor keeps the mapping


class SlotCache:
    """Per-layer key/value tensors of shape [slots, kv_heads, capacity, head_dim], plus the root
    prefix (the first conversation's prompt) stored once per layer and never copied into a slot.
    A slot holds only its conversation's own positions: those past its `base`, the leading
    positions it shares with the root, position p at index p - base (a step's `StepMetadata`
    writes and reads them)."""

    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (slots, kv_heads, capacity, head_dim)
        self.keys = [zeros(shape, dtype, device) for _ in range(layers)]
        self.values = [zeros(shape, dtype, device) for _ in range(layers)]
        self.capacity = capacity
        self.root: list[tuple[torch.Tensor, torch.Tensor]] = []   # per layer [kv_heads, length, dim]

    @property
    def bytes(self) -> int:
        stored = (*self.keys, *self.values, *(t for pair in self.root for t in pair))
        return sum(t.numel() * t.element_size() for t in stored)

    def grow(self, capacity: int, lengths: list[int]) -> None:
        """Room for `capacity` positions a slot. `lengths`: the positions each leading slot holds;
        only those are copied, so the new mapping is backed where the old one was written, not
        over the whole old capacity."""
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = zeros((*old.shape[:2], capacity, old.shape[3]), old.dtype, old.device)
                for slot, n in enumerate(lengths):
                    if n > 0:
                        new[slot, :, :n] = old[slot, :, :n]
                store[i] = new
        self.capacity = capacity

    def copy(self, source: int, target: int, length: int) -> None:
        """Slot `target` takes the first `length` stored positions of slot `source`."""
        for store in (self.keys, self.values):
            for tensor in store:
                tensor[target, :, :length] = tensor[source, :, :length]

    def take_root(self, other: "SlotCache", length: int) -> None:
        """The root: the first `length` positions of slot 0 of `other` (the cache the first
        conversation's prompt was encoded into)."""
        # a copy of its own, contiguous: the native kernel reads it as a cache of one slot
        self.root = [(k[0, :, :length].contiguous(), v[0, :, :length].contiguous())
                     for k, v in zip(other.keys, other.values)]
