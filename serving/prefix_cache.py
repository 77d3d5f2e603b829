"""Automatic prefix caching (vLLM's idea, on this engine's per-request prefill).

Every chat request begins with the same template and system turn, and a user often sends the same
preamble again. The keys and values of a prompt's leading full blocks of ``block_tokens`` tokens
are kept after its prefill; a later prompt that starts with the same blocks reuses them and
prefills only the rest. A block is named by a chained hash of its tokens and of every block
before it, so a lookup costs one pass over the prompt and a hit is an exact token match (the
entry keeps its tokens and they are compared). Entries belong to one model (one policy version:
a hot-swapped batch starts an empty cache) and are evicted least recently used beyond
``max_entries``. The n samples of a request share its prefill anyway (``Batch.prefill``).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch


@dataclass
class PrefixEntry:
    tokens: tuple[int, ...]  # block-aligned
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [1, heads, len(tokens), dim]


class PrefixCache:
    def __init__(self, max_entries: int = 64, block_tokens: int = 16) -> None:
        self.max_entries = max_entries
        self.block_tokens = block_tokens
        self._entries: collections.OrderedDict[int, PrefixEntry] = collections.OrderedDict()  # by full-length hash
        self._blocks: dict[int, tuple[int, int]] = {}  # block-chain hash -> (entry key, prefix length)
        self.hit_tokens = 0  # prompt tokens served from the cache, since start
        self.lookups = 0

    def _chain(self, tokens: list[int]) -> list[int]:
        """The chained hash after each full block of ``tokens``."""
        hashes, value, b = [], 0, self.block_tokens
        for start in range(0, len(tokens) - b + 1, b):
            value = hash((value, tuple(tokens[start:start + b])))
            hashes.append(value)
        return hashes

    def lookup(self, tokens: list[int]) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]]] | None:
        """The longest cached block-aligned prefix of ``tokens`` that leaves at least one token to
        prefill (the next token's logits come from the last one): (its length, per-layer keys and
        values, views the caller must not write into), or None."""
        if self.max_entries <= 0:
            return None
        self.lookups += 1
        found = self._find(tokens)
        if found is None:
            return None
        key, length = found
        entry = self._entries[key]
        self._entries.move_to_end(key)
        self.hit_tokens += length
        return length, [(k[:, :, :length], v[:, :, :length]) for k, v in entry.layers]

    def cached_tokens(self, tokens: list[int]) -> int:
        """How many leading tokens of ``tokens`` ``lookup`` would find, without using the entry."""
        found = self._find(tokens) if self.max_entries > 0 else None
        return 0 if found is None else found[1]

    def _find(self, tokens: list[int]) -> tuple[int, int] | None:
        """(entry key, length) of the longest cached block-aligned prefix, leaving one token."""
        usable = tokens[: len(tokens) - 1]
        for depth, value in reversed(list(enumerate(self._chain(usable), start=1))):
            found = self._blocks.get(value)
            if found is None:
                continue
            key, _ = found
            entry = self._entries.get(key)
            length = depth * self.block_tokens
            if entry is None or entry.tokens[:length] != tuple(usable[:length]):
                continue  # a stale index or a hash collision: not a match
            return key, length
        return None

    def store(self, tokens: list[int], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep the leading full blocks of a prefilled prompt (``layers``: its keys and values,
        ``[1, heads, >= len(tokens), dim]``); copies them, so the caller's buffers stay its own."""
        if self.max_entries <= 0:
            return
        chain = self._chain(tokens[: len(tokens) - 1])
        if not chain:
            return
        key = chain[-1]
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        length = len(chain) * self.block_tokens
        self._entries[key] = PrefixEntry(tuple(tokens[:length]),
                                         [(k[:, :, :length].clone(), v[:, :, :length].clone()) for k, v in layers])
        for depth, value in enumerate(chain, start=1):
            self._blocks[value] = (key, depth * self.block_tokens)  # the newest entry answers a shared block
            if depth < len(chain) and value in self._entries:
                # an entry this one extends (an earlier chunk of this prompt, an earlier turn of a
                # conversation): every block of it is answered by this one now
                del self._entries[value]
        while len(self._entries) > self.max_entries:
            old_key, old = self._entries.popitem(last=False)
            for value in self._chain(list(old.tokens)):
                if self._blocks.get(value, (None,))[0] == old_key:
                    del self._blocks[value]

    def __len__(self) -> int:
        return len(self._entries)
