"""The held-out split: which rankings and prompts are only ever evaluated on, never trained on.

Membership is a hash of a stable key (a group id for rankings, the rendered prompt's text for
PPO prompts), so it never changes and every process agrees: a group (all its rankings) or a
prompt is either always evaluated on or always trained on, whichever run sees it.
"""

from __future__ import annotations

import hashlib
from typing import Protocol, Sequence, TypeVar


class RenderedPrompt(Protocol):
    """A prompt the held-out split can key: its rendered text and its token ids."""

    text: str
    token_ids: Sequence[int]


P = TypeVar("P", bound=RenderedPrompt)


def is_held_out(key: str, fraction: float) -> bool:
    """Whether ``key`` belongs to the held-out slice of size ``fraction``."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_prompts(prompts: Sequence[P], fraction: float) -> tuple[list[P], list[P]]:
    """(training prompts, held-out prompts), each prompt once, by a hash of its text."""
    seen: set[str] = set()
    train, held_out = [], []
    for prompt in prompts:
        key = prompt.text or " ".join(map(str, prompt.token_ids))
        if key in seen:
            continue
        seen.add(key)
        (held_out if is_held_out(key, fraction) else train).append(prompt)
    return train, held_out
