"""The engine's model runner: the model(s) and the running batches' key/value caches.

It runs forwards (one left-padded prefill of the prompts admitted together, one decode step of a
whole batch) and keeps each batch's rows in step with its cache rows, but never samples or looks
inside a row: rows are the engine's objects, carried in the same order as the cache.

On a GPU the model, the caches and the forwards' inputs live on the device; the small bookkeeping
tensors (each row's padding and newest token) stay on the host, and the logits come back to the
host, where the engine samples with each request's own seeded generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch

from flywheel.models import cache_argument
from serving.decode_step import lean_decoder
from serving.kv_cache import BatchKVCache
from serving.prefix_cache import PrefixCache
from serving.scheduler import CacheUse


@dataclass
class Prefill:
    """Prompts prefilled together: their cache (each prompt's n rows together, in order), the
    next-token logits ``[rows, vocab]``, each row's left padding, and each prompt's tokens taken
    from the prefix cache."""

    cache: BatchKVCache
    logits: torch.Tensor
    pads: torch.Tensor
    prefix_hits: list[int]


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
        self.decoder = lean_decoder(model)  # None: the model decodes through transformers' forward
        self.prefixes = PrefixCache(prefix_cache_entries)  # this model's prompt prefixes (kept across clear())
        self.clear()

    def clear(self) -> None:
        self.cache = BatchKVCache(self.num_layers)
        self.rows: list[Any] = []
        self.extents: list[int] = []  # the most cache columns each row can reach (prompt + max_new_tokens)
        self.pads = torch.zeros(0, dtype=torch.long)
        self.last_tokens = torch.zeros(0, 1, dtype=torch.long)  # each row's newest token, fed next step

    def prefill(self, prompts: list[tuple[list[int], int]]) -> Prefill:
        """Prefill several prompts in ONE left-padded forward, each row repeated into its ``n``
        rows (the n samples share it): ``prompts`` is (token ids, n) per prompt.

        A prompt whose leading blocks are in the prefix cache starts from them: the forward runs
        the columns after the shortest cached part (the longest uncached rest decides the width),
        so a row whose cached prefix reaches further recomputes those few tokens, which costs what
        padding would. Each row's positions count from its first real token and its padding is
        masked out, so every row's next-token logits are those of the prompt alone.
        """
        lengths = [len(ids) for ids, _ in prompts]
        hits = [self.prefixes.lookup(ids) for ids, _ in prompts]
        starts = [0 if hit is None else hit[0] for hit in hits]
        total = max(lengths)  # columns of the prefilled cache; row i's tokens fill the last lengths[i]
        width = max(length - start for length, start in zip(lengths, starts))  # the columns this forward runs
        past = total - width  # columns taken from the prefix cache (zero without a hit)
        pads = [total - length for length in lengths]
        cache = BatchKVCache(self.num_layers)
        reused = [max(0, length - width) for length in lengths]  # each row's cached tokens kept as they are
        if past:
            cache.load_prefixes([None if not use else [(k[:, :, :use], v[:, :, :use]) for k, v in hit[1]]
                                 for hit, use in zip(hits, reused)], past, headroom=width)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, ((tokens, _), use) in enumerate(zip(prompts, reused)):
            rest = tokens[use:]
            ids[row, width - len(rest):] = torch.tensor(rest, dtype=torch.long)
        pad = torch.tensor(pads, dtype=torch.long)
        extra = {}
        if any(pads):  # left padding: mask it, and count each row's positions from its first real token
            extra["attention_mask"] = self._on_device((torch.arange(total).unsqueeze(0) >= pad.unsqueeze(1)).long())
            extra["position_ids"] = self._on_device(
                (torch.arange(past, total).unsqueeze(0) - pad.unsqueeze(1)).clamp(min=0))
        out = self.model(input_ids=self._on_device(ids), use_cache=True, logits_to_keep=1, **extra,
                         **cache_argument(self.model, cache))
        views = [layer.view() for layer in cache.layers]
        for row, (tokens, _) in enumerate(prompts):
            left = pads[row]
            self.prefixes.store(tokens, [(k[row:row + 1, :, left:], v[row:row + 1, :, left:]) for k, v in views])
        counts = [n for _, n in prompts]
        cache.repeat_rows(counts)
        repeats = torch.tensor(counts)
        return Prefill(cache, self._on_host(out.logits[:, -1]).repeat_interleave(repeats, dim=0),
                       pad.repeat_interleave(repeats), starts)

    def prefill_chunk(self, tokens: list[int]) -> int:
        """Prefill ``tokens`` (the leading part of a long prompt) into the prefix cache only, from
        the longest part of them already there; returns the tokens it found there. The prompt's
        last prefill (``prefill``) then starts where its chunks ended, so a long prompt is computed
        over several steps with the running rows decoding between them."""
        return self.prefill([(tokens, 1)]).prefix_hits[0]

    @property
    def extent(self) -> int:
        """The widest the batch's cache can get: its widest row's prompt + max_new_tokens."""
        return max(self.extents, default=0)

    def add(self, prefilled: list[Prefill], rows: list[Any], first_tokens: torch.Tensor, extents: list[int]) -> None:
        """Append the rows of one step's prefills at once (one copy of the cache, however many
        prompts joined), with the engine's row objects, their first tokens and their cache extents,
        in the same order."""
        self.extents.extend(extents)
        self.cache.column_limit = self.extent
        pad_ours, pad_new = self.cache.append([p.cache for p in prefilled])
        self.pads = torch.cat([self.pads + pad_ours] + [p.pads + extra for p, extra in zip(prefilled, pad_new)])
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
        self.extents = [self.extents[i] for i in keep]
        self.cache.column_limit = self.extent
        self.cache.keep_rows(rows, drop_leading=drop)
        self.pads = pads - drop
        self.last_tokens = self.last_tokens[rows]
        self.rows = [self.rows[i] for i in keep]

    def forward_step(self) -> torch.Tensor:
        """Decode one token for every row; returns the logits [rows, vocab] (by the lean decode step
        where it covers the model: the same logits, less fixed cost)."""
        if self.decoder is None:
            return self.transformers_step()
        positions = (self.cache.length - self.pads).unsqueeze(1)
        return self._on_host(self.decoder.step(self._on_device(self.last_tokens), self._on_device(positions),
                                               self._on_device(self.pads), self.cache))

    def transformers_step(self) -> torch.Tensor:
        """``forward_step`` through the model's own forward."""
        length = self.cache.length
        positions = torch.arange(length + 1)
        attention_mask = (positions.unsqueeze(0) >= self.pads.unsqueeze(1)).long()
        position_ids = (length - self.pads).unsqueeze(1)
        out = self.model(input_ids=self._on_device(self.last_tokens), attention_mask=self._on_device(attention_mask),
                         position_ids=self._on_device(position_ids), use_cache=True,
                         **cache_argument(self.model, self.cache))
        return self._on_host(out.logits[:, -1])

    def _on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor where the model computes (itself on the CPU)."""
        return tensor if self.device.type == "cpu" else tensor.to(self.device, non_blocking=True)

    @staticmethod
    def _on_host(logits: torch.Tensor) -> torch.Tensor:
        """Logits where the engine samples: the host (a no-op on the CPU)."""
        return logits if logits.device.type == "cpu" else logits.to("cpu")


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

    def cache_use(self) -> CacheUse:
        """What the running batches may take of the cache (``serving.scheduler.CacheUse``): new rows
        join the current batch."""
        current = self.current
        return CacheUse(len(current.rows), current.extent, sum(len(b.rows) * b.extent for b in self.batches[:-1]))

    @property
    def cache_bytes(self) -> int:
        """The bytes the running batches' cache buffers take now."""
        return sum(b.cache.allocated_bytes for b in self.batches)

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
