"""A key/value cache for a batch whose rows come and go (continuous batching).

Rows are left-padded so that every row's newest token sits in the same column, which lets one
``forward`` call decode the whole batch (the layout of TGI's original ``CausalLMBatch``). Unlike
transformers' ``DynamicCache``, which concatenates a new tensor every step, each layer writes into
a preallocated buffer that grows geometrically, so a decode step copies only the new token.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class GrowingLayer(CacheLayerMixin):
    """One attention layer's keys and values: buffers ``[rows, heads, capacity, head_dim]``."""

    is_sliding = False
    is_compileable = False

    def __init__(self) -> None:
        super().__init__()
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _reserve(self, needed: int, template: torch.Tensor, values_template: torch.Tensor) -> None:
        capacity = 0 if self.keys is None else self.keys.shape[2]
        if needed <= capacity:
            return
        new_capacity = max(needed, 2 * capacity, 64)
        rows, heads, _, dim = template.shape
        keys = template.new_zeros(rows, heads, new_capacity, dim)
        values = values_template.new_zeros(rows, values_template.shape[1], new_capacity, values_template.shape[3])
        if self.length:
            keys[:, :, : self.length] = self.keys[:, :, : self.length]
            values[:, :, : self.length] = self.values[:, :, : self.length]
        self.keys, self.values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        step = key_states.shape[2]
        self._reserve(self.length + step, key_states, value_states)
        self.keys[:, :, self.length : self.length + step] = key_states
        self.values[:, :, self.length : self.length + step] = value_states
        self.length += step
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.length = 0
        self.is_initialized = False

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    def assign(self, keys: torch.Tensor, values: torch.Tensor, headroom: int = 64) -> None:
        """Replace the contents with ``keys``/``values`` (``[rows, heads, length, dim]``) plus free columns."""
        rows, heads, length, dim = keys.shape
        self.keys = keys.new_zeros(rows, heads, length + headroom, dim)
        self.values = values.new_zeros(rows, values.shape[1], length + headroom, values.shape[3])
        self.keys[:, :, :length] = keys
        self.values[:, :, :length] = values
        self.length = length
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True


class BatchKVCache(Cache):
    """The whole model's cache for a left-padded batch, with the row operations the scheduler needs."""

    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[GrowingLayer() for _ in range(num_layers)])

    @property
    def rows(self) -> int:
        first = self.layers[0]
        return 0 if first.keys is None else first.keys.shape[0]

    @property
    def length(self) -> int:
        return self.layers[0].length

    def repeat_rows(self, times: int) -> None:
        """Turn one prefilled prompt into ``times`` rows that share its keys/values (the n samples)."""
        for layer in self.layers:
            keys, values = layer.view()
            layer.assign(keys.expand(times, -1, -1, -1), values.expand(times, -1, -1, -1))

    def keep_rows(self, rows: torch.Tensor, drop_leading: int = 0) -> None:
        """Keep only ``rows`` (an index tensor), dropping ``drop_leading`` all-padding columns on the left."""
        for layer in self.layers:
            keys, values = layer.view()
            layer.assign(keys[rows, :, drop_leading:], values[rows, :, drop_leading:])

    def append(self, other: "BatchKVCache") -> tuple[int, int]:
        """Add ``other``'s rows below ours, left-padding whichever is shorter.

        Returns the padding columns added to (our rows, other's rows), so the caller can keep each
        row's pad count right.
        """
        if self.rows == 0:
            for mine, theirs in zip(self.layers, other.layers):
                mine.assign(*theirs.view())
            return 0, 0
        length = max(self.length, other.length)
        pad_ours, pad_theirs = length - self.length, length - other.length
        for mine, theirs in zip(self.layers, other.layers):
            a_keys, a_values = mine.view()
            b_keys, b_values = theirs.view()
            keys = a_keys.new_zeros(a_keys.shape[0] + b_keys.shape[0], a_keys.shape[1], length, a_keys.shape[3])
            values = a_values.new_zeros(keys.shape[0], a_values.shape[1], length, a_values.shape[3])
            keys[: a_keys.shape[0], :, pad_ours:] = a_keys
            keys[a_keys.shape[0] :, :, pad_theirs:] = b_keys
            values[: a_keys.shape[0], :, pad_ours:] = a_values
            values[a_keys.shape[0] :, :, pad_theirs:] = b_values
            mine.assign(keys, values)
        return pad_ours, pad_theirs
