"""The engine's static per-slot KV cache: each conversation in flight owns one slot (a row of
[slots, kv_heads, capacity, head_dim] tensors per layer); new keys and values are written in
place, so no step ever copies the cache the way a growing `torch.cat` cache does. The model's
forward sees it as its cache object (it calls `update` once per layer); the engine's attention
function (attention.py) reads each row's part of it."""

from __future__ import annotations

import math
import mmap

import torch


def kv_layout(config) -> dict:
    """Shape of the model's KV cache per layer: layers, kv_heads, head_dim."""
    heads = config.num_attention_heads
    return dict(layers=config.num_hidden_layers,
                kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads)


def kv_bytes_per_token(model) -> int:
    """Bytes of keys and values one cached position takes, all layers together."""
    shape = kv_layout(model.config)
    return 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * next(model.parameters()).element_size()




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
    positions it shares with the root, position p at index p - base. Every forward runs its rows'
    new ids packed into one sequence (no padding goes through the model's linear layers). Before
    it, `bind` says which slots take part, how many ids each brings, at which positions, and each
    row's base; the model then calls `update` once per layer (the one Cache method its forward
    uses) and the engine's attention function reads the rest from here."""

    # Forwards of at most this many ids a row (decode steps, drafts included) take their own-part
    # attention from the native kernel where there is one (cai/backends/decode_attention.c);
    # longer ones (prefills) from PyTorch's flash kernel, whose blocked GEMMs suit many queries.
    NATIVE_MAX_IDS = 16
    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device, native=None):
        shape = (slots, kv_heads, capacity, head_dim)
        self.keys = [zeros(shape, dtype, device) for _ in range(layers)]
        self.values = [zeros(shape, dtype, device) for _ in range(layers)]
        self.capacity = capacity
        self.root: list[tuple[torch.Tensor, torch.Tensor]] = []   # per layer [kv_heads, length, dim]
        self.native = native                # kernels.decode_attention() or None
        # the forward being run (see `bind`)
        self.slots: torch.Tensor | None = None        # [rows] slot of each row
        self.offsets: torch.Tensor | None = None      # [rows + 1] row b's ids are offsets[b]:offsets[b+1]
        self.positions: torch.Tensor | None = None    # [ids] position of each id in its conversation
        self.index: torch.Tensor | None = None        # [ids] where its key and value go in its slot
        self._id_slots: torch.Tensor | None = None    # [ids] slot of each id
        self._write_rows: torch.Tensor | None = None  # [kv_heads × ids] see bind
        self.common = 0                               # root positions every row of this forward takes
        self.root_end = 0                             # root positions some row takes (the most)
        self._ragged: torch.Tensor | None = None      # [ids, root_end - common] mask of the rest
        self._ragged_groups: dict[int, torch.Tensor] = {}
        self.native_rows = 0                          # leading rows the native kernel takes
        self.first_padded = 0                         # first id of the rows PyTorch's kernels take
        # for PyTorch's kernels: those rows' ids laid out padded, [rows, width], and the mask
        self.pad_index: torch.Tensor | None = None    # [rows, width] id at each place (pads repeat the last)
        self.id_row: torch.Tensor | None = None       # [ids] row of each id
        self.id_column: torch.Tensor | None = None    # [ids] place of each id in its row
        self.mask: torch.Tensor | None = None         # [rows, width, own positions]
        self._kv_len = 0

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

    def bind(self, slots: list[int], counts: list[int], positions: list[int], bases: list[int]) -> None:
        """Row b of this forward is slot slots[b] and brings counts[b] ids, packed in row order;
        `positions`: each id's position in its conversation; `bases`: how many leading positions
        row b takes from the root (its slot holds the positions from there on). Leading rows of
        at most NATIVE_MAX_IDS ids (decode rows come first) go to the native kernel where there
        is one; the rest to PyTorch's kernels."""
        device = self.keys[0].device
        self.slots = torch.tensor(slots, device=device)
        counts_t = torch.tensor(counts, device=device)
        self.offsets = torch.nn.functional.pad(counts_t.cumsum(0), (1, 0))
        self.positions = torch.tensor(positions, device=device)
        self._id_slots = self.slots.repeat_interleave(counts_t)
        base_of_id = [base for base, n in zip(bases, counts) for _ in range(n)]
        index = [p - b for p, b in zip(positions, base_of_id)]     # lists: no wait on a device
        self.index = torch.tensor(index, device=device)
        # each (kv head, id)'s row of `update`'s writes in a layer's cache seen as [rows, dim]
        heads = self.keys[0].shape[1]
        self._write_rows = ((self._id_slots[None, :] * heads + torch.arange(heads, device=device)[:, None])
                            * self.capacity + self.index[None, :]).reshape(-1)
        self.common, self.root_end = (min(bases), max(bases)) if self.root else (0, 0)
        self._ragged_groups = {}
        self._ragged = None
        if self.root_end > self.common:
            # root positions [common, root_end): row b sees those below its own base
            id_bases = torch.tensor(base_of_id, device=device)
            seen = torch.arange(self.common, self.root_end, device=device)[None, :] < id_bases[:, None]
            # a finite mask: a query that sees none of these keys gets this part's weight zero
            # (exp of a huge negative log-sum-exp) rather than the NaN of a softmax over -inf alone
            dtype = self.keys[0].dtype
            self._ragged = torch.zeros(seen.shape, dtype=dtype, device=device)
            self._ragged.masked_fill_(~seen, torch.finfo(dtype).min / 2)
        short = 0
        while self.native is not None and short < len(counts) and counts[short] <= self.NATIVE_MAX_IDS:
            short += 1
        self.native_rows = short
        self.first_padded = sum(counts[:short])       # ids from here on go to PyTorch's kernels
        if short == len(counts):
            self.pad_index = None
            return
        # PyTorch's kernels want rows padded to one width: row b's j-th id at [b, j]
        rest = counts_t[short:]
        rows, width = len(rest), max(counts[short:])
        starts = self.offsets[short:-1]
        self.id_row = torch.arange(rows, device=device).repeat_interleave(rest)
        self.id_column = torch.arange(self.first_padded, len(positions), device=device) - starts[self.id_row]
        column = torch.minimum(torch.arange(width, device=device)[None, :], rest[:, None] - 1)
        self.pad_index = starts[:, None] + column                                     # [rows, width]
        self._kv_len = max(index[self.first_padded:]) + 1
        keys = torch.arange(self._kv_len, device=device)
        allowed = keys[None, None, :] <= self.index[self.pad_index][:, :, None]        # [rows, width, kv]
        self.mask = torch.zeros(allowed.shape, dtype=self.keys[0].dtype, device=device)
        self.mask.masked_fill_(~allowed, float("-inf"))

    def root_parts(self, layer: int, group: int):
        """The root's keys and values this forward reads, in at most two parts, each with its mask
        for queries laid out [group × ids] (None: every query sees it): the positions every row
        takes, then those only some rows take."""
        if not self.root_end:
            return []
        keys, values = self.root[layer]
        parts = []
        if self.common:
            parts.append((keys[None, :, :self.common], values[None, :, :self.common], None))
        if self._ragged is not None:
            if group not in self._ragged_groups:
                self._ragged_groups[group] = self._ragged.repeat(group, 1)[None, None]
            parts.append((keys[None, :, self.common:self.root_end], values[None, :, self.common:self.root_end],
                          self._ragged_groups[group]))
        return parts

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Writes the forward's keys and values [1, kv_heads, ids, dim] into their slots and
        returns the layer's whole cache (attention reads each row's part from it)."""
        for store, new in ((self.keys, key_states), (self.values, value_states)):
            layer = store[layer_idx]     # (kept in its own dtype: bfloat16 beside float32 activations)
            # one row copy per (kv head, id): 17 against 39 µs for 256 ids as an index_put over
            # [slot, :, position], measured alone (no difference measurable in a whole step)
            dim = layer.shape[-1]
            layer.view(-1, dim).index_copy_(0, self._write_rows, new[0].reshape(-1, dim).to(layer.dtype))
        return self.keys[layer_idx], self.values[layer_idx]

    def padded_part(self, keys: torch.Tensor) -> torch.Tensor:
        """The stored positions [0, kv_len) of the rows PyTorch's kernels take: [rows, kv_heads, own, dim]."""
        return keys[self.slots[self.native_rows:], :, :self._kv_len]

    def copy(self, source: int, target: int, length: int) -> None:
        """Slot `target` takes the first `length` stored positions of slot `source`."""
        for store in (self.keys, self.values):
            for tensor in store:
                tensor[target, :, :length] = tensor[source, :, :length]

    def take_root(self, other: "SlotCache", length: int) -> None:
        """The root: the first `length` positions of slot 0 of `other` (the cache the first
        conversation's prompt was encoded into)."""
        self.root = [(k[0, :, :length], v[0, :, :length]) for k, v in zip(other.keys, other.values)]
