"""The engine's static per-slot KV cache: each conversation in flight owns one slot (a row of
[slots, kv_heads, capacity, head_dim] tensors per layer); new keys and values are written in
place, so no step ever copies the cache the way a growing `torch.cat` cache does. The model's
forward sees it as its cache object (it calls `update` once per layer); the engine's attention
function (attention.py) reads each row's part of it."""

from __future__ import annotations

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




class SlotCache:
    """Per-layer key/value tensors of shape [slots, kv_heads, capacity, head_dim], plus the root
    prefix (the first conversation's prompt) once per layer. Every forward runs its rows' new ids
    packed into one sequence (no padding goes through the model's linear layers). Before it,
    `bind` says which slots take part, how many ids each brings and at which positions, and how
    much of the root every row shares; the model then calls `update` once per layer (the one Cache
    method its forward uses) and the engine's attention function reads the rest from here."""

    # Forwards of at most this many ids a row (decode steps, drafts included) take their own-part
    # attention from the native kernel where there is one (cai/backends/decode_attention.c);
    # longer ones (prefills) from PyTorch's flash kernel, whose blocked GEMMs suit many queries.
    NATIVE_MAX_IDS = 16

    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device, native=None):
        shape = (slots, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.capacity = capacity
        self.root: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.shared = 0                     # root positions every row of this forward shares
        self.native = native                # kernels.decode_attention() or None
        # the forward being run (see `bind`)
        self.slots: torch.Tensor | None = None        # [rows] slot of each row
        self.offsets: torch.Tensor | None = None      # [rows + 1] row b's ids are offsets[b]:offsets[b+1]
        self.positions: torch.Tensor | None = None    # [ids] cache position of each id
        self._id_slots: torch.Tensor | None = None    # [ids] slot of each id
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
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def grow(self, capacity: int) -> None:
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = old.new_zeros((*old.shape[:2], capacity, old.shape[3]))
                new[:, :, :self.capacity] = old
                store[i] = new
        self.capacity = capacity

    def bind(self, slots: list[int], counts: list[int], positions: list[int], shared: int) -> None:
        """Row b of this forward is slot slots[b] and brings counts[b] ids, packed in row order;
        `positions`: where each id's key and value go; `shared`: how many leading positions
        every row takes from the root. Leading rows of at most NATIVE_MAX_IDS ids (decode rows
        come first) go to the native kernel where there is one; the rest to PyTorch's kernels."""
        device = self.keys[0].device
        self.slots = torch.tensor(slots, device=device)
        counts_t = torch.tensor(counts, device=device)
        self.offsets = torch.nn.functional.pad(counts_t.cumsum(0), (1, 0))
        self.positions = torch.tensor(positions, device=device)
        self._id_slots = self.slots.repeat_interleave(counts_t)
        self.shared = shared
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
        rows, width = len(rest), int(rest.max())
        starts = self.offsets[short:-1]
        self.id_row = torch.arange(rows, device=device).repeat_interleave(rest)
        self.id_column = torch.arange(self.first_padded, len(positions), device=device) - starts[self.id_row]
        column = torch.minimum(torch.arange(width, device=device)[None, :], rest[:, None] - 1)
        self.pad_index = starts[:, None] + column                                     # [rows, width]
        self._kv_len = int(self.positions[self.first_padded:].max()) + 1
        keys = torch.arange(shared, self._kv_len, device=device)
        allowed = keys[None, None, :] <= self.positions[self.pad_index][:, :, None]    # [rows, width, kv]
        self.mask = torch.zeros(allowed.shape, dtype=self.keys[0].dtype, device=device)
        self.mask.masked_fill_(~allowed, float("-inf"))

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Writes the forward's keys and values [1, kv_heads, ids, dim] into their slots and
        returns the layer's whole cache (attention reads each row's part from it)."""
        for store, new in ((self.keys, key_states), (self.values, value_states)):
            store[layer_idx][self._id_slots, :, self.positions] = new[0].transpose(0, 1)
        return self.keys[layer_idx], self.values[layer_idx]

    def padded_part(self, keys: torch.Tensor) -> torch.Tensor:
        """The own positions [shared, kv_len) of the rows PyTorch's kernels take: [rows, kv_heads, own, dim]."""
        return keys[self.slots[self.native_rows:], :, self.shared:self._kv_len]

    def copy(self, source: int, target: int, length: int) -> None:
        for store in (self.keys, self.values):
            for tensor in store:
                tensor[target, :, :length] = tensor[source, :, :length]

    def save_root(self, slot: int, length: int) -> None:
        self.root = [(k[slot, :, :length].clone(), v[slot, :, :length].clone()) for k, v in zip(self.keys, self.values)]

    def load_root(self, slot: int, length: int) -> None:
        for (rk, rv), k, v in zip(self.root, self.keys, self.values):
            k[slot, :, :length] = rk[:, :length]
            v[slot, :, :length] = rv[:, :length]
