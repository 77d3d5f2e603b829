"""The engine's model runner: the model(s) and the running batches' key/value caches.

It runs forwards (a prompt's prefill, one decode step of a whole batch) and keeps each batch's
rows in step with its cache rows, but never samples or looks inside a row: rows are the
engine's objects, carried in the same order as the cache.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from flywheel.models import cache_argument
from serving.kv_cache import BatchKVCache
from serving.prefix_cache import PrefixCache


class Batch:
    """The running rows of one policy version: its model, its left-padded cache and the rows.

    After a hot-swap, the old version's batch keeps decoding until its rows finish (so every
    completion comes from one version), while new requests join the new version's batch.
    """

    def __init__(self, model: torch.nn.Module, version: int, device: torch.device,
                 prefix_cache_entries: int = 64) -> None:
        self.model = model
        self.version = version
        self.device = device
        self.num_layers = model.config.num_hidden_layers
        self.prefixes = PrefixCache(prefix_cache_entries)  # this model's prompt prefixes (kept across clear())
        self.last_prefix_hit = 0  # prompt tokens the last prefill took from the prefix cache
        self.clear()

    def clear(self) -> None:
        self.cache = BatchKVCache(self.num_layers)
        self.rows: list[Any] = []
        self.pads = torch.zeros(0, dtype=torch.long)
        self.last_tokens = torch.zeros(0, 1, dtype=torch.long)  # each row's newest token, fed next step

    def prefill(self, prompt_token_ids: list[int], n: int) -> tuple[BatchKVCache, torch.Tensor]:
        """Run a prompt once into a cache of its own, repeated into ``n`` rows (the n samples share
        it); returns that cache and the logits of the next token ``[n, vocab]``."""
        cache = BatchKVCache(self.num_layers)
        hit = self.prefixes.lookup(prompt_token_ids)
        start = self.last_prefix_hit = 0
        if hit is not None:  # the prompt's leading blocks were prefilled before: only the rest runs
            start, layers = hit
            self.last_prefix_hit = start
            for layer, (keys, values) in zip(cache.layers, layers):
                layer.assign(keys, values, headroom=len(prompt_token_ids) - start)
        ids = torch.tensor([prompt_token_ids[start:]], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_argument(self.model, cache))
        self.prefixes.store(prompt_token_ids, [layer.view() for layer in cache.layers])
        cache.repeat_rows(n)
        return cache, out.logits[:, -1].expand(n, -1)

    def add(self, prefilled: BatchKVCache, rows: list[Any], first_tokens: torch.Tensor) -> None:
        """Append a prefilled cache's rows, with the engine's row objects and their first tokens."""
        pad_ours, pad_new = self.cache.append(prefilled)
        self.pads = torch.cat([self.pads + pad_ours, torch.full((len(rows),), pad_new, dtype=torch.long)])
        self.rows.extend(rows)
        self.last_tokens = torch.cat([self.last_tokens, first_tokens.unsqueeze(1)])

    def keep(self, keep: list[int]) -> None:
        """Keep only the rows at these indices (in order), in the cache as in ``rows``."""
        if not keep:
            self.clear()
            return
        rows = torch.tensor(keep, dtype=torch.long)
        pads = self.pads[rows]
        drop = int(pads.min())  # columns that are padding in every remaining row
        self.cache.keep_rows(rows, drop_leading=drop)
        self.pads = pads - drop
        self.last_tokens = self.last_tokens[rows]
        self.rows = [self.rows[i] for i in keep]

    def forward_step(self) -> torch.Tensor:
        """Decode one token for every row; returns the logits [rows, vocab]."""
        length = self.cache.length
        positions = torch.arange(length + 1)
        attention_mask = (positions.unsqueeze(0) >= self.pads.unsqueeze(1)).long()
        position_ids = (length - self.pads).unsqueeze(1)
        out = self.model(input_ids=self.last_tokens, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **cache_argument(self.model, self.cache))
        return out.logits[:, -1]


class ModelRunner:
    """The batches being decoded, one per policy version still running; the last one belongs to the
    current version and is the one new requests join."""

    def __init__(self, model: torch.nn.Module, version: int = 0, prefix_cache_entries: int = 64) -> None:
        self.device = next(model.parameters()).device  # where prompts go (the first model's, as before)
        self.prefix_cache_entries = prefix_cache_entries
        self.batches: list[Batch] = [Batch(model, version, self.device, prefix_cache_entries)]

    @property
    def current(self) -> Batch:
        return self.batches[-1]

    @property
    def running_sequences(self) -> int:
        return sum(len(b.rows) for b in self.batches)

    def rows(self) -> Iterator[Any]:
        return (row for b in self.batches for row in b.rows)

    def swap(self, model: torch.nn.Module, version: int) -> int:
        """Make ``version`` current (called at a step boundary). Rows already running stay on their
        model; returns how many do."""
        if self.current.rows:
            self.batches.append(Batch(model, version, self.device, self.prefix_cache_entries))
        else:
            self.batches[-1] = Batch(model, version, self.device, self.prefix_cache_entries)
        return sum(len(b.rows) for b in self.batches[:-1])

    def release_finished_versions(self) -> None:
        """An old version's batch goes (with its model) once its last row is done."""
        self.batches = [b for b in self.batches[:-1] if b.rows] + [self.batches[-1]]

    def clear(self) -> None:
        for batch in self.batches:
            batch.clear()
