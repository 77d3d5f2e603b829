"""Incremental detokenization and stop-string handling for one sample.

Decoding a whole sequence every step is quadratic, and decoding one token at a time breaks
multi-byte characters; this follows TGI/vLLM: decode a short window before and after the newest
token and emit only the stable difference. Stop strings are searched in the text as it grows, and
the tail that could still become a stop string is held back from streaming.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = (), min_tokens: int = 0) -> None:
        self.tokenizer = tokenizer
        self.min_tokens = min_tokens  # stop strings completed before this many tokens do not count
        self.stop = tuple(s for s in stop if s)
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.token_ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.prefix_offset = 0
        self.read_offset = 0
        self.stopped = False

    def add(self, token_id: int, skip: bool = False) -> None:
        """Append a generated token; ``skip`` for tokens that carry no text (end of sequence)."""
        self.token_ids.append(token_id)
        if skip or self.stopped:
            return
        ids = self.token_ids
        prefix = self.tokenizer.decode(ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full = self.tokenizer.decode(ids[self.prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            before = len(self.text)
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(ids)
            self._check_stop(before)

    def _check_stop(self, before: int) -> None:
        if not self.stop or len(self.token_ids) < self.min_tokens:
            return
        start = max(0, before - self.holdback)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def take_delta(self, final: bool = False) -> str:
        """Text not yet streamed; while unfinished, keeps back what could begin a stop string."""
        end = len(self.text) if (final or self.stopped) else max(self.emitted, len(self.text) - self.holdback)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta
