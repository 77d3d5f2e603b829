"""The rankings stream: every accepted ranking, human or AI, on one Redis stream.

Trainers read it through consumer groups (the reward-model trainer uses ``reward-model``), so
each group sees every entry at least once: an entry stays pending until the consumer
acknowledges it, which it does only after it has durably used it (e.g. after the model trained
on it is saved). When a consumer dies, another consumer of the same group reclaims its pending
entries with XAUTOCLAIM once they have been idle for ``min_idle_ms``. The stream is trimmed only
below the oldest entry that some consumer group still needs, so nothing is lost to trimming.

Appending is one Lua script, so the idempotency check, the XADD, the per-group record that the
scheduler and the agreement measure read, and the counters change together or not at all.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import redis

from feedback.agreement import Agreement, pairwise_agreement
from feedback.redis_text import text, text_dict
from flywheel.quoting import quote

if TYPE_CHECKING:
    from flywheel.config import FeedbackConfig

log = logging.getLogger(__name__)

RANKINGS_STREAM = "flywheel:rankings"
DEAD_LETTER_STREAM = "flywheel:rankings:dead"  # entries no consumer could parse, kept for a person
IDEMPOTENCY_KEY_PREFIX = "flywheel:rankings:idempotency:"  # + source + ":" + the caller's key
GROUP_RANKINGS_KEY_PREFIX = "flywheel:group-rankings:"  # hash: source -> latest ranking (JSON ids)
GROUP_ANNOTATORS_KEY_PREFIX = "flywheel:group-annotators:"  # set: people who ranked the group (one ranking each)
STATS_KEY = "flywheel:rankings:stats"  # hash of counters: rankings:{source}, agreement:pairs, agreement:agreed

SOURCE_HUMAN = "human"
SOURCE_AI = "ai"
SOURCES = (SOURCE_HUMAN, SOURCE_AI)
REWARD_MODEL_CONSUMER_GROUP = "reward-model"

LAG_COUNT_LIMIT = 10_000  # on Redis < 7 lag is counted entry by entry, up to this many

MIN_RANKED = 2
MAX_RANKED = 9  # InstructGPT asks labelers to rank K = 4..9


def group_rankings_key(group_id: str) -> str:
    return GROUP_RANKINGS_KEY_PREFIX + group_id


def group_annotators_key(group_id: str) -> str:
    return GROUP_ANNOTATORS_KEY_PREFIX + group_id


class AlreadyRankedError(Exception):
    """This annotator has ranked this group already: a person gets one ranking per group."""

    def __init__(self, group_id: str, annotator_id: str) -> None:
        super().__init__(f"{quote(annotator_id)} has ranked group {group_id} already "
                         f"(one ranking per annotator per group)")
        self.group_id = group_id
        self.annotator_id = annotator_id


@dataclass
class RankingEntry:
    """One ranking as it travels on the stream. Every field is a string on the wire."""

    group_id: str
    completion_ids: list[str]  # best first
    source: str
    policy_version: int = 0
    annotator_id: str = ""
    comment: str = ""
    judge_id: str = ""  # ai only: which judge model (and constitution) produced it
    pair_probabilities: list[tuple[str, str, float]] = field(default_factory=list)  # ai only: (a, b, P(a > b))
    confidence: float | None = None  # ai only
    ranking_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")

    def to_fields(self) -> dict[str, str]:
        fields = {
            "ranking_id": self.ranking_id,
            "group_id": self.group_id,
            "completion_ids": json.dumps(list(self.completion_ids)),
            "source": self.source,
            "annotator_id": self.annotator_id,
            "comment": self.comment,
            "policy_version": str(int(self.policy_version)),
            "created_at": repr(float(self.created_at)),
        }
        if self.source == SOURCE_AI:
            fields["judge_id"] = self.judge_id
            fields["pair_probabilities"] = json.dumps([[a, b, float(p)] for a, b, p in self.pair_probabilities])
            fields["confidence"] = repr(float(self.confidence or 0.0))
        return fields

    @classmethod
    def from_fields(cls, raw: dict) -> "RankingEntry":
        """Parse a stream entry; raises ValueError (or KeyError) on a malformed one."""
        f = text_dict(raw)
        confidence = f.get("confidence", "")
        return cls(
            group_id=f["group_id"],
            completion_ids=[str(c) for c in json.loads(f["completion_ids"])],
            source=f["source"],
            policy_version=int(f.get("policy_version") or 0),
            annotator_id=f.get("annotator_id", ""),
            comment=f.get("comment", ""),
            judge_id=f.get("judge_id", ""),
            pair_probabilities=[(str(a), str(b), float(p))
                                for a, b, p in json.loads(f.get("pair_probabilities") or "[]")],
            confidence=float(confidence) if confidence else None,
            ranking_id=f["ranking_id"],
            created_at=float(f["created_at"]),
        )


@dataclass(frozen=True)
class AppendResult:
    ranking_id: str
    entry_id: str
    duplicate: bool  # an earlier submission with the same idempotency key; nothing was recorded
    agreement: Agreement | None = None  # vs. the other source's ranking of the same group, when one exists


@dataclass(frozen=True)
class ConsumerGroupStats:
    name: str
    pending: int  # delivered, not yet acknowledged
    lag: int  # not yet delivered
    last_delivered_id: str


@dataclass(frozen=True)
class StreamStats:
    length: int
    rankings: dict[str, int]  # by source, ever accepted
    consumer_groups: list[ConsumerGroupStats]
    agreement: Agreement


_APPEND_SCRIPT = """
-- KEYS: stream, per-group rankings hash, stats hash, idempotency key, per-group annotators set
-- ARGV: use_idempotency, idempotency_ttl, group_ttl, source, other_source, completion_ids_json,
--       ranking_id, annotator ('' = not limited to one ranking), then the entry's field/value pairs
if ARGV[1] == '1' then
  local prior = redis.call('GET', KEYS[4])
  if prior then return {'duplicate', prior, ''} end
end
if ARGV[8] ~= '' and redis.call('SISMEMBER', KEYS[5], ARGV[8]) == 1 then
  return {'already_ranked', '', ''}
end
local fields = {}
for i = 9, #ARGV do fields[#fields + 1] = ARGV[i] end
local id = redis.call('XADD', KEYS[1], '*', unpack(fields))
if ARGV[1] == '1' then
  redis.call('SET', KEYS[4], ARGV[7] .. ' ' .. id, 'EX', tonumber(ARGV[2]))
end
if ARGV[8] ~= '' then
  redis.call('SADD', KEYS[5], ARGV[8])
  redis.call('EXPIRE', KEYS[5], tonumber(ARGV[3]))
end
local other = redis.call('HGET', KEYS[2], ARGV[5])
redis.call('HSET', KEYS[2], ARGV[4], ARGV[6])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
redis.call('HINCRBY', KEYS[3], 'rankings:' .. ARGV[4], 1)
return {'added', id, other or ''}
"""


class RankingStream:
    """Appends rankings (exactly once per idempotency key) and reports on the stream."""

    def __init__(self, client: redis.Redis, stream: str = RANKINGS_STREAM, group_ttl_seconds: int = 7 * 24 * 3600,
                 idempotency_ttl_seconds: int = 7 * 24 * 3600) -> None:
        self.redis = client
        self.stream = stream
        self.group_ttl_seconds = int(group_ttl_seconds)
        self.idempotency_ttl_seconds = int(idempotency_ttl_seconds)
        self._append = client.register_script(_APPEND_SCRIPT)

    # ---- writing ----

    @staticmethod
    def idempotency_key(source: str, key: str) -> str:
        """Keys live per source, so no client key can collide with (or pre-empt) the labeler's."""
        return f"{IDEMPOTENCY_KEY_PREFIX}{source}:{key}"

    def find_duplicate(self, source: str, idempotency_key: str) -> AppendResult | None:
        """The acknowledgement of an earlier submission from ``source`` with this key, if there was one."""
        if not idempotency_key:
            return None
        prior = self.redis.get(self.idempotency_key(source, idempotency_key))
        return None if prior is None else _duplicate(prior)

    def append(self, entry: RankingEntry, idempotency_key: str = "") -> AppendResult:
        """Add one ranking; with an idempotency key already used, return the first acknowledgement.

        A named person ranks a group once: a second human ranking of the group by the same
        ``annotator_id`` (under another idempotency key) raises ``AlreadyRankedError``. Anonymous
        rankings (no annotator_id) and the AI labeler's (idempotent per judge) are not limited here.
        """
        other_source = SOURCE_AI if entry.source == SOURCE_HUMAN else SOURCE_HUMAN
        ids_json = json.dumps(list(entry.completion_ids))
        once_per = entry.annotator_id if entry.source == SOURCE_HUMAN else ""
        args: list[str] = ["1" if idempotency_key else "0", str(self.idempotency_ttl_seconds),
                           str(self.group_ttl_seconds), entry.source, other_source, ids_json, entry.ranking_id,
                           once_per]
        for name, value in entry.to_fields().items():
            args += [name, value]
        keys = [self.stream, group_rankings_key(entry.group_id), STATS_KEY,
                self.idempotency_key(entry.source, idempotency_key or "-"), group_annotators_key(entry.group_id)]
        status, entry_id, other = self._append(keys=keys, args=args)
        if text(status) == "duplicate":
            return _duplicate(entry_id)
        if text(status) == "already_ranked":
            raise AlreadyRankedError(entry.group_id, entry.annotator_id)
        agreement = None
        if text(other):
            agreement = pairwise_agreement(json.loads(text(other)), list(entry.completion_ids))
            pipe = self.redis.pipeline(transaction=True)
            pipe.hincrby(STATS_KEY, "agreement:pairs", agreement.pairs)
            pipe.hincrby(STATS_KEY, "agreement:agreed", agreement.agreed_pairs)
            pipe.execute()
        return AppendResult(entry.ranking_id, text(entry_id), False, agreement)

    # ---- reporting and trimming ----

    def consumer_groups(self) -> list[ConsumerGroupStats]:
        try:
            groups = self.redis.xinfo_groups(self.stream)
        except redis.ResponseError:  # no such stream yet
            return []
        out = []
        for g in groups:
            g = {text(k): v for k, v in g.items()}
            last = text(g.get("last-delivered-id")) or "0-0"
            lag = g.get("lag")
            if lag is None:  # Redis < 7 does not report lag: count what lies after the last delivery
                lag = len(self.redis.xrange(self.stream, "(" + last, "+", count=LAG_COUNT_LIMIT))
            out.append(ConsumerGroupStats(text(g["name"]), int(g.get("pending") or 0), int(lag), last))
        return out

    def waiting_for(self, group_name: str) -> int:
        """Entries ``group_name`` has not acknowledged yet (all of them before it first reads)."""
        group = next((g for g in self.consumer_groups() if g.name == group_name), None)
        return int(self.redis.xlen(self.stream)) if group is None else group.lag + group.pending

    def stats(self) -> StreamStats:
        pipe = self.redis.pipeline(transaction=False)
        pipe.xlen(self.stream)
        pipe.hgetall(STATS_KEY)
        length, counters = pipe.execute()
        counters = {k: int(v) for k, v in text_dict(counters).items()}
        return StreamStats(
            length=int(length),
            rankings={s: counters.get("rankings:" + s, 0) for s in SOURCES},
            consumer_groups=self.consumer_groups(),
            agreement=Agreement(counters.get("agreement:agreed", 0), counters.get("agreement:pairs", 0)),
        )

    def trim_acknowledged(self) -> int:
        """Delete entries every consumer group has acknowledged; returns how many went.

        The bound is the lowest of, per group, its oldest pending entry or (with nothing
        pending) the entry after its last delivered one. Bounds only move forward while we look,
        so a bound computed a moment ago is still safe. With no consumer group nothing is trimmed.
        """
        groups = self.consumer_groups()
        if not groups:
            return 0
        bounds = []
        for g in groups:
            if g.pending:
                oldest = self.redis.xpending(self.stream, g.name)["min"]
                bounds.append(_parse_id(text(oldest)))
            else:
                ms, seq = _parse_id(g.last_delivered_id)
                bounds.append((ms, seq + 1))
        ms, seq = min(bounds)
        return int(self.redis.xtrim(self.stream, minid=f"{ms}-{seq}", approximate=False))


def _parse_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _duplicate(prior: bytes | str) -> AppendResult:
    ranking_id, _, entry_id = text(prior).partition(" ")
    return AppendResult(ranking_id, entry_id, True)


@dataclass(frozen=True)
class ReceivedRanking:
    entry_id: str
    ranking: RankingEntry


class RankingConsumer:
    """One consumer of a consumer group: at-least-once delivery of rankings.

    ``read`` returns, in this order: entries this consumer name held when its process last died
    (on the first read only), entries of other consumers idle for ``min_idle_ms`` (XAUTOCLAIM),
    then new entries (XREADGROUP). Call ``ack`` only after the rankings are durably used. A
    consumer that holds entries longer than ``min_idle_ms`` on purpose calls ``keep_alive`` so
    that they are not reclaimed from under it.
    """

    def __init__(self, client: redis.Redis, group_name: str, consumer_name: str, *, stream: str = RANKINGS_STREAM,
                 min_idle_ms: int = 300_000, start_id: str = "0") -> None:
        self.redis = client
        self.group_name = group_name
        self.consumer_name = consumer_name
        self.stream = stream
        self.min_idle_ms = int(min_idle_ms)
        self.start_id = start_id
        self._held: set[str] = set()  # delivered to this instance, not yet acknowledged
        self._recovered = False
        self._ensure_group()

    @classmethod
    def from_settings(cls, client: redis.Redis, settings: "FeedbackConfig", group_name: str,
                      consumer_name: str) -> "RankingConsumer":
        """A consumer that reclaims after ``settings.rankings_claim_idle_seconds``."""
        return cls(client, group_name, consumer_name, min_idle_ms=int(settings.rankings_claim_idle_seconds * 1000))

    def _ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(self.stream, self.group_name, id=self.start_id, mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read(self, count: int = 100, block_ms: int | None = None) -> list[ReceivedRanking]:
        """Up to ``count`` rankings; waits up to ``block_ms`` for new ones when none are due.

        Raises ``redis.ConnectionError`` while Redis is down; call again once it is back.
        """
        try:
            return self._read(count, block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # the stream or the group is gone (a Redis without persistence restarted): start over
            log.warning("consumer group %s of %s vanished; recreating it", self.group_name, self.stream)
            self._held.clear()
            self._ensure_group()
            return self._read(count, block_ms)

    def _read(self, count: int, block_ms: int | None) -> list[ReceivedRanking]:
        raw: list[tuple] = []
        if not self._recovered:
            reply = self.redis.xreadgroup(self.group_name, self.consumer_name, {self.stream: "0"}, count=count)
            raw += _messages(reply)
            self._recovered = True
        if len(raw) < count:
            raw += self._reclaim(count - len(raw))
        if len(raw) < count:
            block = None if raw or not block_ms else int(block_ms)
            reply = self.redis.xreadgroup(self.group_name, self.consumer_name, {self.stream: ">"},
                                          count=count - len(raw), block=block)
            raw += _messages(reply)
        return self._parse(raw)

    def _reclaim(self, count: int) -> list[tuple]:
        reply = self.redis.xautoclaim(self.stream, self.group_name, self.consumer_name, self.min_idle_ms,
                                      start_id="0-0", count=count)
        messages = reply[1] if len(reply) > 1 else []
        # XAUTOCLAIM also resets our own idle entries; those were handed out already
        return [m for m in messages if m[0] is not None and text(m[0]) not in self._held]

    def _parse(self, raw: list[tuple]) -> list[ReceivedRanking]:
        out: list[ReceivedRanking] = []
        dead: list[str] = []
        for message in raw:
            if message is None or message[0] is None:
                continue
            entry_id, fields = text(message[0]), message[1]
            if fields is None:  # deleted while pending (Redis 6.2 reports it so): nothing to deliver
                dead.append(entry_id)
                continue
            try:
                ranking = RankingEntry.from_fields(fields)
            except (KeyError, ValueError, TypeError) as exc:
                log.error("ranking %s is malformed (%s); moved to %s", entry_id, exc, DEAD_LETTER_STREAM)
                self.redis.xadd(DEAD_LETTER_STREAM, {**text_dict(fields), "source_entry_id": entry_id})
                dead.append(entry_id)
                continue
            if entry_id not in self._held:
                self._held.add(entry_id)
                out.append(ReceivedRanking(entry_id, ranking))
        if dead:
            self.redis.xack(self.stream, self.group_name, *dead)
        return out

    def ack(self, entry_ids: list[str]) -> int:
        """Mark entries as durably used by this consumer group."""
        if not entry_ids:
            return 0
        done = int(self.redis.xack(self.stream, self.group_name, *entry_ids))
        self._held.difference_update(entry_ids)
        return done

    def keep_alive(self) -> None:
        """Reset the idle time of the entries this consumer holds, so no one reclaims them."""
        if self._held:
            self.redis.xclaim(self.stream, self.group_name, self.consumer_name, 0, sorted(self._held), justid=True)


def _messages(reply) -> list[tuple]:
    """The (id, fields) pairs of an XREADGROUP reply."""
    return [m for _, stream_messages in (reply or []) for m in stream_messages]
