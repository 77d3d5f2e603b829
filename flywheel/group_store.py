"""Served completion groups, kept in Redis so that they can be ranked later.

Every Complete/StreamComplete stores its group once it finishes (``flywheel.contracts.groups``
is the record): the rendered prompt, each sample's text, token ids and per-token
log-probabilities (PPO and the reward model need the exact tokens the policy produced), the
policy version and the sampling parameters. A group expires after ``ttl_seconds`` (7 days by
default), after which it can no longer be ranked.

Saving is one round trip (a script: a memory check, a SET with expiry and a ZADD) so serving does
not wait on Redis more than once per request. The sorted set lists rankable groups (two samples or
more) by creation time for the AI labeler's scheduler, which decides later which of them it ranks.

Groups are most of what Redis holds (about 33 bytes per generated token, for the group TTL), and
the same Redis holds what must never be refused: rankings, the registries and their audit, run
locks, the Celery broker. So with a ``maxmemory`` set, a group is stored only while Redis uses less
than ``max_memory_fraction`` of it (checked in the same script, on Redis's own figures); above it
``save`` raises ``GroupStoreFull`` and serving goes on (the group just cannot be ranked), so the
rest of the memory stays free for the control state.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import redis

from flywheel.contracts.groups import CompletionGroup, GroupResult
from flywheel.contracts.keys import GROUP_KEY_PATTERN, LABELLING_CANDIDATES_KEY, group_key

SCAN_BATCH = 500  # group records fetched per MGET while scanning them all

# KEYS: the group's key, the labelling candidates. ARGV: record, TTL, group id, created_at,
# 1 = a labelling candidate, the fraction of maxmemory groups may fill. Returns {stored, used, max}.
# INFO is read with pcall: a Redis that refuses it (some managed services) stores without the check.
SAVE_GROUP_SCRIPT = """
local used, max = 0, 0
local info = redis.pcall('INFO', 'memory')
if type(info) == 'string' then
  used = tonumber(string.match(info, 'used_memory:(%d+)')) or 0
  max = tonumber(string.match(info, 'maxmemory:(%d+)')) or 0
end
if max > 0 and used + string.len(ARGV[1]) > max * tonumber(ARGV[6]) then
  return {0, used, max}
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
if ARGV[5] == '1' then
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
end
return {1, used, max}
"""


class GroupStoreFull(redis.RedisError):
    """Redis is above the share of its maxmemory that served groups may use: the group was not
    stored (serving goes on; the message says how full Redis is and what to change)."""


class GroupStore:
    """Saves and loads completion groups under ``flywheel:group:{group_id}`` with a TTL."""

    def __init__(self, client: redis.Redis, ttl_seconds: int = 7 * 24 * 3600,
                 max_memory_fraction: float = 0.9) -> None:
        if ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be positive, got {ttl_seconds}")
        if not 0 < max_memory_fraction <= 1:
            raise ValueError(f"max_memory_fraction must be in (0, 1], got {max_memory_fraction}")
        self.redis = client
        self.ttl_seconds = int(ttl_seconds)
        self.max_memory_fraction = float(max_memory_fraction)
        self._save_script = client.register_script(SAVE_GROUP_SCRIPT)

    def save(self, result: GroupResult) -> None:
        """Store a finished group (one round trip). Raises ``GroupStoreFull`` above the memory share
        of groups, ``redis.RedisError`` when Redis is down."""
        self.save_group(CompletionGroup.from_result(result))

    def save_group(self, group: CompletionGroup) -> None:
        candidate = len(group.completions) >= 2  # a single sample has nothing to be ranked against
        stored, used, most = self._save_script(
            keys=[group_key(group.group_id), LABELLING_CANDIDATES_KEY],
            args=[group.to_json(), self.ttl_seconds, group.group_id, group.created_at, int(candidate),
                  repr(self.max_memory_fraction)])
        if not stored:
            raise GroupStoreFull(
                f"group {group.group_id} not stored: Redis uses {used / 2**20:.0f} MiB of its maxmemory "
                f"{most / 2**20:.0f} MiB, above the {self.max_memory_fraction:.0%} that served groups may fill "
                f"(FLYWHEEL_GROUP_MAX_MEMORY_FRACTION); the rest is kept for rankings, registries and locks. "
                f"Raise maxmemory (FLYWHEEL_REDIS_MAX_MEMORY_MB) or shorten FLYWHEEL_GROUP_TTL_SECONDS")

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
