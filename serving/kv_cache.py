"""A key/value cache for a batch whose rows come and go (continuous batching).

Rows are left-padded so that every row's newest token sits in the same column, which lets one
``forward`` call decode the whole batch (the layout of TGI's original ``CausalLMBatch``). Unlike
transformers' ``DynamicCache``, which concatenates a new tensor every step, each layer writes into
a preallocated buffer that grows geometrically, so a decode step copies only the new token. The
growth stops at ``column_limit`` (the widest its rows can get, set by the batch), so the buffers
stay within the engine's cache budget (``serving.scheduler``).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes one token's keys and values take in every layer of ``model``'s cache."""
    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = next(model.parameters()).element_size()
    return 2 * config.num_hidden_layers * heads * head_dim * element


class GrowingLayer(CacheLayerMixin):
    """One attention layer's keys and values: buffers ``[rows, heads, capacity, head_dim]``."""

    is_sliding = False
    is_compileable = False

    def __init__(self) -> None:
        super().__init__()
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.length = 0
        self.column_limit = 0  # the most columns the buffers need (0 = no limit)

    def _capacity(self, needed: int, wanted: int) -> int:
        """``wanted`` columns (``needed`` and headroom), but no more than ``column_limit`` allows."""
        return min(wanted, max(needed, self.column_limit)) if self.column_limit else wanted

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _reserve(self, needed: int, template: torch.Tensor, values_template: torch.Tensor) -> None:
        capacity = 0 if self.keys is None else self.keys.shape[2]
        if needed <= capacity:
            return
        new_capacity = self._capacity(needed, max(needed, 2 * capacity, 64))
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
        capacity = self._capacity(length, length + headroom)
        self.keys = keys.new_zeros(rows, heads, capacity, dim)
        self.values = values.new_zeros(rows, values.shape[1], capacity, values.shape[3])
        self.keys[:, :, :length] = keys
        self.values[:, :, :length] = values
        self.length = length
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        """Take ``keys``/``values`` (``[rows, heads, capacity, dim]``) as the buffers, their first
        ``length`` columns filled: no copy, for a caller that built them with headroom."""
        self.keys, self.values, self.length = keys, values, length
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

    @property
    def column_limit(self) -> int:
        return self.layers[0].column_limit

    @column_limit.setter
    def column_limit(self, columns: int) -> None:
        for layer in self.layers:
            layer.column_limit = columns

    @property
    def allocated_bytes(self) -> int:
        """The bytes of every layer's key and value buffers, headroom included (every layer's are
        alike: the engine reads this each step)."""
        first = self.layers[0]
        if first.keys is None:
            return 0
        per_layer = first.keys.numel() * first.keys.element_size() + first.values.numel() * first.values.element_size()
        return per_layer * len(self.layers)

    def load_prefixes(self, prefixes: list[list[tuple[torch.Tensor, torch.Tensor]] | None], length: int,
                      headroom: int) -> None:
        """Start ``len(prefixes)`` rows of ``length`` columns from keys/values already computed (a
        prefix-cache hit: per layer ``[1, heads, <= length, dim]``), each row's right-aligned so the
        rows are left-padded; ``None`` is a row of padding only. Leaves ``headroom`` free columns."""
        template = next(p for p in prefixes if p is not None)
        for index, layer in enumerate(self.layers):
            k0, v0 = template[index]
            keys = k0.new_zeros(len(prefixes), k0.shape[1], length + headroom, k0.shape[3])
            values = v0.new_zeros(len(prefixes), v0.shape[1], length + headroom, v0.shape[3])
            for row, prefix in enumerate(prefixes):
                if prefix is not None:
                    k, v = prefix[index]
                    keys[row, :, length - k.shape[2]:length] = k[0]
                    values[row, :, length - v.shape[2]:length] = v[0]
            layer.adopt(keys, values, length)

    def repeat_rows(self, counts: list[int]) -> None:
        """Turn each prefilled prompt's row into ``counts[i]`` rows that share its keys/values (the n samples)."""
        if all(c == 1 for c in counts):
            return
        repeats = torch.tensor(counts, device=self.layers[0].keys.device)
        for layer in self.layers:
            keys, values = layer.view()
            layer.assign(keys.repeat_interleave(repeats, dim=0, output_size=sum(counts)),
                         values.repeat_interleave(repeats, dim=0, output_size=sum(counts)))

    def keep_rows(self, rows: torch.Tensor, drop_leading: int = 0) -> None:
        """Keep only ``rows`` (an index tensor), dropping ``drop_leading`` all-padding columns on the left."""
        if self.layers[0].keys is not None:
            rows = rows.to(self.layers[0].keys.device)
        for layer in self.layers:
            keys, values = layer.view()
            layer.assign(keys[rows, :, drop_leading:], values[rows, :, drop_leading:])

    def append(self, others: list["BatchKVCache"], headroom: int = 64) -> tuple[int, list[int]]:
        """Add the rows of ``others`` below ours, in order, left-padding whichever are shorter: one
        new buffer per layer, however many caches join (a step's prefills join at once).

        Returns the padding columns added to (our rows, each other's rows), so the caller can keep
        each row's pad count right.
        """
        parts = ([self] if self.rows else []) + [o for o in others if o.rows]
        if not parts:
            return 0, [0] * len(others)
        length = max(p.length for p in parts)
        pad = {id(p): length - p.length for p in parts}
        pad_ours = pad.get(id(self), 0)
        pad_theirs = [pad.get(id(o), 0) for o in others]
        if len(parts) == 1 and parts[0] is self:
            return pad_ours, pad_theirs
        rows = sum(p.rows for p in parts)
        capacity = self.layers[0]._capacity(length, length + headroom)
        for index, mine in enumerate(self.layers):
            views = [p.layers[index].view() for p in parts]
            k0, v0 = views[0]
            keys = k0.new_zeros(rows, k0.shape[1], capacity, k0.shape[3])
            values = v0.new_zeros(rows, v0.shape[1], capacity, v0.shape[3])
            start = 0
            for part, (k, v) in zip(parts, views):
                left = pad[id(part)]
                keys[start:start + k.shape[0], :, left:length] = k
                values[start:start + k.shape[0], :, left:length] = v
                start += k.shape[0]
            mine.adopt(keys, values, length)
        return pad_ours, pad_theirs
