"""The held-out split: which rankings and prompts are only ever evaluated on, never trained on.

Membership is a hash of a stable key (a group id for rankings, the rendered prompt's text for
PPO prompts), so it never changes and every process agrees: a group (all its rankings) or a
prompt is either always evaluated on or always trained on, whichever run sees it.
"""

from __future__ import annotations

import hashlib
from typing import Protocol, Sequence, TypeVar

from flywheel.contracts.artifacts import JUDGE_MEMBER, POLICY_MEMBER


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


def reward_model_member(group_id: str) -> str:
    """Which member of the reward model trains on a group's rankings: "policy" or "judge", by a
    hash of the group id independent of the held-out one. Always the same member, so the judge
    never sees a group the policy member trained on, in this run or any other."""
    digest = hashlib.sha256(f"member:{group_id}".encode()).digest()
    return POLICY_MEMBER if digest[0] % 2 == 0 else JUDGE_MEMBER


def judge_trains_on(group_id: str, heldout_fraction: float) -> bool:
    """Whether the judge member trains on a group's rankings (``heldout_fraction``: the reward
    model's). Whatever else learns from rankings must leave these alone, or the judge would no longer
    be a signal the policy was not optimised against."""
    return not is_held_out(group_id, heldout_fraction) and reward_model_member(group_id) == JUDGE_MEMBER


def prompt_is_held_out(prompt: RenderedPrompt, fraction: float) -> bool:
    """Whether a prompt is in the held-out slice: a hash of its text (of its token ids without one)."""
    return is_held_out(prompt.text or " ".join(map(str, prompt.token_ids)), fraction)


def split_prompts(prompts: Sequence[P], fraction: float) -> tuple[list[P], list[P]]:
    """(training prompts, held-out prompts), each prompt once, by a hash of its text."""
    seen: set[str] = set()
    train, held_out = [], []
    for prompt in prompts:
        key = prompt.text or " ".join(map(str, prompt.token_ids))
        if key in seen:
            continue
        seen.add(key)
        (held_out if prompt_is_held_out(prompt, fraction) else train).append(prompt)
    return train, held_out
