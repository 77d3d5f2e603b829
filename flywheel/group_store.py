"""Served completion groups, kept in Redis so that they can be ranked later.

Every Complete/StreamComplete stores its group once it finishes (``flywheel.contracts.groups``
is the record): the rendered prompt, each sample's text, token ids and per-token
log-probabilities (PPO and the reward model need the exact tokens the policy produced), the
policy version and the sampling parameters. A group expires after ``ttl_seconds`` (7 days by
default), after which it can no longer be ranked.

Saving is one pipelined round trip (a SET with expiry and a ZADD) so serving does not wait on
Redis more than once per request. The sorted set lists rankable groups (two samples or more) by
creation time for the AI labeler's scheduler, which decides later which of them it ranks.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import redis

from flywheel.contracts.groups import CompletionGroup, GroupResult
from flywheel.contracts.keys import GROUP_KEY_PATTERN, LABELLING_CANDIDATES_KEY, group_key

SCAN_BATCH = 500  # group records fetched per MGET while scanning them all


class GroupStore:
    """Saves and loads completion groups under ``flywheel:group:{group_id}`` with a TTL."""

    def __init__(self, client: redis.Redis, ttl_seconds: int = 7 * 24 * 3600) -> None:
        if ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be positive, got {ttl_seconds}")
        self.redis = client
        self.ttl_seconds = int(ttl_seconds)

    def save(self, result: GroupResult) -> None:
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

    def records(self, group_ids: Sequence[str]) -> list[bytes | str | None]:
        """The stored JSON of each group (None where it expired), in one MGET. Left undecoded
        (``CompletionGroup.from_json``) so that one malformed record does not hide the others."""
        return list(self.redis.mget([group_key(g) for g in group_ids])) if group_ids else []

    def all_records(self) -> Iterator[bytes | str]:
        """The stored JSON of every group in Redis (a SCAN, then MGETs), undecoded like ``records``."""
        keys = list(self.redis.scan_iter(match=GROUP_KEY_PATTERN, count=1000))
        for start in range(0, len(keys), SCAN_BATCH):
            for raw in self.redis.mget(keys[start:start + SCAN_BATCH]):
                if raw is not None:  # expired between SCAN and MGET
                    yield raw

    def remaining_ttl(self, group_id: str) -> int:
        """Seconds the group still lives (0 when gone), so records about it can expire with it."""
        ttl = self.redis.ttl(group_key(group_id))
        return max(int(ttl), 0) if ttl is not None else 0
