"""What one forward needs besides the cache's storage: which slots its rows are, where each id's
key and value go, which root positions each row sees, and what the native kernel (or, without
it, PyTorch's) reads. Built fresh for every forward (`StepMetadata(cache, ...)`), it is the
object the model's forward gets as its cache (it calls `update` once per layer) and the one the
engine's attention function (attention.py) reads; the storage (kv_cache.py) keeps nothing of a
step."""

from __future__ import annotations

import torch

from cai.backends.kv_cache import SlotCache


class StepMetadata:
    """Row b of this forward is slot slots[b] and brings counts[b] ids, packed in row order into
    one sequence (no padding goes through the model's linear layers); `positions`: each id's
    position in its conversation; `bases`: how many leading positions row b takes from the root
    (its slot holds the positions from there on).

    Where there is a native kernel (`native`, kernels.decode_attention()), it takes every row and
    the root too: a query's keys are summed in one order, block by block from position 0, whether
    its id came in a decode step, a draft or a prefill, alone or beside other rows, so an id's
    result does not depend on how its conversation was cut into forwards or what shared them
    (what keeps a run's records the same however it is batched). PyTorch's kernels (no compiler,
    or a GPU) block their sums by the shape of each call."""

    def __init__(self, cache: SlotCache, slots: list[int], counts: list[int], positions: list[int],
                 bases: list[int], native=None):
        self.cache = cache
        self.native = native
        device = cache.keys[0].device
        self.kv_heads = cache.keys[0].shape[1]
        self.slots = torch.tensor(slots, device=device)                        # [rows] slot of each row
        counts_t = torch.tensor(counts, device=device)
        self.offsets = torch.nn.functional.pad(counts_t.cumsum(0), (1, 0))     # row b's ids: offsets[b]:offsets[b+1]
        self.positions = torch.tensor(positions, device=device)                # [ids] position in its conversation
        id_slots = self.slots.repeat_interleave(counts_t)
        base_of_id = [base for base, n in zip(bases, counts) for _ in range(n)]
        index = [p - b for p, b in zip(positions, base_of_id)]     # lists: no wait on a device
        self.index = torch.tensor(index, device=device)       # [ids] where its key and value go in its slot
        # each (kv head, id)'s row of `update`'s writes in a layer's cache seen as [rows, dim]
        heads = self.kv_heads
        self.write_rows = ((id_slots[None, :] * heads + torch.arange(heads, device=device)[:, None])
                            * cache.capacity + self.index[None, :]).reshape(-1)
        # root positions every row of this forward takes, and those some row takes (the most)
        self.common, self.root_end = (min(bases), max(bases)) if cache.root else (0, 0)
        self._ragged_groups: dict[int, torch.Tensor] = {}
        self.ragged: torch.Tensor | None = None       # [ids, root_end - common] mask of the rest
        if self.root_end > self.common and native is None:
            # root positions [common, root_end): row b sees those below its own base
            id_bases = torch.tensor(base_of_id, device=device)
            seen = torch.arange(self.common, self.root_end, device=device)[None, :] < id_bases[:, None]
            # a finite mask: a query that sees none of these keys gets this part's weight zero
            # (exp of a huge negative log-sum-exp) rather than the NaN of a softmax over -inf alone
            dtype = cache.keys[0].dtype
            self.ragged = torch.zeros(seen.shape, dtype=dtype, device=device)
            self.ragged.masked_fill_(~seen, torch.finfo(dtype).min / 2)
        # the native kernel: each id reads the root up to its row's base (none: -1)
        self.root_positions: torch.Tensor | None = None
        self.root_slots: torch.Tensor | None = None
        if native is not None and self.root_end:
            self.root_positions = torch.tensor(base_of_id, device=device) - 1
            self.root_slots = torch.zeros(len(slots), dtype=torch.int64, device=device)
        # for PyTorch's kernels: the rows' ids laid out padded, [rows, width], and the mask
        self.pad_index: torch.Tensor | None = None    # [rows, width] id at each place (pads repeat the last)
        self.id_row: torch.Tensor | None = None       # [ids] row of each id
        self.id_column: torch.Tensor | None = None    # [ids] place of each id in its row
        self.mask: torch.Tensor | None = None         # [rows, width, own positions]
        self._kv_len = 0
        if native is not None:
            return
        # PyTorch's kernels want rows padded to one width: row b's j-th id at [b, j]
        rows, width = len(counts), max(counts)
        starts = self.offsets[:-1]
        self.id_row = torch.arange(rows, device=device).repeat_interleave(counts_t)
        self.id_column = torch.arange(len(positions), device=device) - starts[self.id_row]
        column = torch.minimum(torch.arange(width, device=device)[None, :], counts_t[:, None] - 1)
        self.pad_index = starts[:, None] + column                                     # [rows, width]
        self._kv_len = max(index) + 1
        keys = torch.arange(self._kv_len, device=device)
        allowed = keys[None, None, :] <= self.index[self.pad_index][:, :, None]        # [rows, width, kv]
        self.mask = torch.zeros(allowed.shape, dtype=cache.keys[0].dtype, device=device)
        self.mask.masked_fill_(~allowed, float("-inf"))

    def root_parts(self, layer: int, group: int):
        """The root's keys and values this forward reads, in at most two parts, each with its mask
        for queries laid out [group × ids] (None: every query sees it): the positions every row
        takes, then those only some rows take."""
        if not self.root_end:
            return []
        keys, values = self.cache.root[layer]
        parts = []
        if self.common:
            parts.append((keys[None, :, :self.common], values[None, :, :self.common], None))
        if self.ragged is not None:
            if group not in self._ragged_groups:
                self._ragged_groups[group] = self.ragged.repeat(group, 1)[None, None]
            parts.append((keys[None, :, self.common:self.root_end], values[None, :, self.common:self.root_end],
                          self._ragged_groups[group]))
        return parts

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Writes the forward's keys and values [1, kv_heads, ids, dim] into their slots and
        returns the layer's whole cache (attention reads each row's part from it): the one
        method of a transformers Cache the model's forward calls."""
        cache = self.cache
        for store, new in ((cache.keys, key_states), (cache.values, value_states)):
            layer = store[layer_idx]     # (kept in its own dtype: bfloat16 beside float32 activations)
            # one row copy per (kv head, id): 17 against 39 µs for 256 ids as an index_put over
            # [slot, :, position], measured alone (no difference measurable in a whole step)
            dim = layer.shape[-1]
            layer.view(-1, dim).index_copy_(0, self.write_rows, new[0].reshape(-1, dim).to(layer.dtype))
        return cache.keys[layer_idx], cache.values[layer_idx]

    def padded_part(self, keys: torch.Tensor) -> torch.Tensor:
        """The stored positions [0, kv_len) of the rows, for PyTorch's kernels: [rows, kv_heads, own, dim]."""
        return keys[self.slots, :, :self._kv_len]
