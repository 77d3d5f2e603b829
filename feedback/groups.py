"""Served completion groups, kept in Redis so that they can be ranked later.

Every Complete/StreamComplete stores its group once it finishes: the rendered prompt, each
sample's text, token ids and per-token log-probabilities (PPO and the reward model need the exact
tokens the policy produced), the policy version and the sampling parameters. A group expires
after ``ttl_seconds`` (7 days by default), after which it can no longer be ranked.

Saving is one pipelined round trip (a SET with expiry and a ZADD) so serving does not wait on
Redis more than once per request. The sorted set lists rankable groups (two samples or more) by
creation time for the AI labeler's scheduler, which decides later which of them it ranks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import redis

if TYPE_CHECKING:  # serving is only a type here: feedback never needs the engine at run time
    from serving.engine import GroupResult

GROUP_KEY_PREFIX = "flywheel:group:"
# group ids by creation time (score = unix seconds) that the labelling scheduler has not decided yet
LABELLING_CANDIDATES_KEY = "flywheel:labelling:candidates"


def group_key(group_id: str) -> str:
    return GROUP_KEY_PREFIX + group_id


@dataclass(frozen=True)
class StoredCompletion:
    completion_id: str
    index: int
    text: str
    finish_reason: str
    token_ids: list[int]
    logprobs: list[float]


@dataclass(frozen=True)
class CompletionGroup:
    """One served group as stored: what was asked, by which policy, and every sample."""

    group_id: str
    policy_version: int
    prompt: str
    prompt_token_ids: list[int]
    params: dict
    created_at: float
    completions: list[StoredCompletion]

    @property
    def completion_ids(self) -> list[str]:
        return [c.completion_id for c in self.completions]

    def completion(self, completion_id: str) -> StoredCompletion | None:
        return next((c for c in self.completions if c.completion_id == completion_id), None)

    def to_json(self) -> str:
        # by hand rather than dataclasses.asdict, whose deep copy doubled the cost of a save
        record = {name: getattr(self, name) for name in _GROUP_FIELDS}
        record["completions"] = [{name: getattr(c, name) for name in _COMPLETION_FIELDS} for c in self.completions]
        return json.dumps(record, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> "CompletionGroup":
        data = json.loads(raw)
        completions = [StoredCompletion(**c) for c in data.pop("completions")]
        return cls(completions=completions, **data)

    @classmethod
    def from_result(cls, result: "GroupResult") -> "CompletionGroup":
        return cls(
            group_id=result.group_id,
            policy_version=int(result.policy_version),
            prompt=result.prompt,
            prompt_token_ids=[int(t) for t in result.prompt_token_ids],
            params=result.params.to_json(),
            created_at=float(result.created_at),
            completions=[
                StoredCompletion(s.completion_id, int(s.index), s.text, s.finish_reason,
                                 [int(t) for t in s.token_ids], [float(x) for x in s.logprobs])
                for s in result.samples
            ],
        )


_GROUP_FIELDS = [f.name for f in fields(CompletionGroup) if f.name != "completions"]
_COMPLETION_FIELDS = [f.name for f in fields(StoredCompletion)]


class GroupStore:
    """Saves and loads completion groups under ``flywheel:group:{group_id}`` with a TTL."""

    def __init__(self, client: redis.Redis, ttl_seconds: int = 7 * 24 * 3600) -> None:
        if ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be positive, got {ttl_seconds}")
        self.redis = client
        self.ttl_seconds = int(ttl_seconds)

    def save(self, result: "GroupResult") -> None:
        """Store a finished group (one round trip). Raises ``redis.RedisError`` when Redis is down."""
        self.save_group(CompletionGroup.from_result(result))

    def save_group(self, group: CompletionGroup) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(group_key(group.group_id), group.to_json(), ex=self.ttl_seconds)
        if len(group.completions) >= 2:  # a single sample has nothing to be ranked against
            pipe.zadd(LABELLING_CANDIDATES_KEY, {group.group_id: group.created_at})
        pipe.execute()

    def load(self, group_id: str) -> CompletionGroup | None:
        """The group, or None when it never existed or has expired."""
        if not group_id:
            return None
        raw = self.redis.get(group_key(group_id))
        return None if raw is None else CompletionGroup.from_json(raw)

    def remaining_ttl(self, group_id: str) -> int:
        """Seconds the group still lives (0 when gone), so records about it can expire with it."""
        ttl = self.redis.ttl(group_key(group_id))
        return max(int(ttl), 0) if ttl is not None else 0
