"""The rankings stream: every accepted ranking, human or AI, on one Redis stream.

Writing (``RankingStream``): appending is one Lua script, so the idempotency check, the XADD, the
per-group record that the labelling scheduler and the agreement measure read, and the counters
change together or not at all. An accepted entry carries a copy of its group's record (field
``group_record``, about 33 bytes per generated token), taken in the same script: a ranking whose
served group expires before a trainer reads it (the TTL is 7 days; a trainer can be down longer)
still trains. The stream is trimmed only below the oldest entry that some consumer group still
needs, so nothing is lost to trimming; the copies go with the entries.

Reading (``RankingStreamReader``, the one consumer): a trainer reads through its consumer group
(the reward-model trainer uses ``reward-model``), so each group sees every entry at least once: an
entry stays pending until the consumer acknowledges it, which it does only after it has durably
used it (the model trained on it is saved). ``claim`` first takes back entries another consumer
left pending for at least ``claim_idle_seconds`` (XAUTOCLAIM; 0 under a fenced run lock, where
every pending entry belongs to a run that died or lost its lease), then reads new ones with
XREADGROUP. ``read`` joins each entry with the served group it ranks (``with_group_records``: the
live record, else the entry's copy); an entry that cannot be used (malformed, or from before copies, with its group
expired) is moved to ``DEAD_LETTER_STREAM`` with the reason and acknowledged in one script, never
acknowledged silently. ``scan_rankings`` reads the whole stream the same way without a consumer
group (the export), so it skips no ranking a trainer would use.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from typing import Callable, Generic, Iterator, TypeVar

import redis

from flywheel.contracts.groups import CompletionGroup
from flywheel.contracts import keys
from flywheel.contracts.keys import DEAD_LETTER_STREAM, RANKINGS_STATS_KEY, RANKINGS_STREAM, REWARD_MODEL_CONSUMER_GROUP
from flywheel.contracts.rankings import (GROUP_RECORD_FIELD, SOURCE_AI, SOURCE_HUMAN, SOURCES, Agreement, RankingEntry,
                                        pairwise_agreement)
from flywheel.contracts.redis_text import text, text_dict
from flywheel.group_store import GroupStore
from flywheel.quoting import quote

log = logging.getLogger(__name__)

LAG_COUNT_LIMIT = 10_000  # on Redis < 7 lag is counted entry by entry, up to this many
CLAIM_BATCH = 256  # entries per XAUTOCLAIM call
SCAN_BATCH = 500  # entries per XRANGE call of scan_rankings

T = TypeVar("T")


class AlreadyRankedError(Exception):
    """This annotator has ranked this group already: a person gets one ranking per group."""

    def __init__(self, group_id: str, annotator_id: str) -> None:
        super().__init__(f"{quote(annotator_id)} has ranked group {group_id} already "
                         f"(one ranking per annotator per group)")
        self.group_id = group_id
        self.annotator_id = annotator_id


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
    dead_letter_length: int  # entries no consumer could use (DEAD_LETTER_STREAM), with their reasons
    rankings: dict[str, int]  # by source, ever accepted
    consumer_groups: list[ConsumerGroupStats]
    agreement: Agreement
    agreement_groups: int = 0  # groups ranked by both a person and the AI labeler (counted since this field exists)


_APPEND_SCRIPT = """
-- KEYS: stream, per-group rankings hash, stats hash, idempotency key, per-group annotators set, group record
-- ARGV: use_idempotency, idempotency_ttl, group_ttl, source, other_source, completion_ids_json,
--       ranking_id, annotator ('' = not limited to one ranking), the group-record field name,
--       the other source's ranking the agreement below was computed from ('' = none), its pairs,
--       its agreed pairs, then the entry's field/value pairs
if ARGV[1] == '1' then
  local prior = redis.call('GET', KEYS[4])
  if prior then return {'duplicate', prior, ''} end
end
if ARGV[8] ~= '' and redis.call('SISMEMBER', KEYS[5], ARGV[8]) == 1 then
  return {'already_ranked', '', ''}
end
local fields = {}
for i = 13, #ARGV do fields[#fields + 1] = ARGV[i] end
local record = redis.call('GET', KEYS[6])
if record then
  fields[#fields + 1] = ARGV[9]
  fields[#fields + 1] = record
end
local id = redis.call('XADD', KEYS[1], '*', unpack(fields))
if ARGV[1] == '1' then
  redis.call('SET', KEYS[4], ARGV[7] .. ' ' .. id, 'EX', tonumber(ARGV[2]))
end
if ARGV[8] ~= '' then
  redis.call('SADD', KEYS[5], ARGV[8])
  redis.call('EXPIRE', KEYS[5], tonumber(ARGV[3]))
end
local other = redis.call('HGET', KEYS[2], ARGV[5])
if other and other == ARGV[10] then  -- counted with the entry, so stats never lag the stream
  redis.call('HINCRBY', KEYS[3], 'agreement:pairs', tonumber(ARGV[11]))
  redis.call('HINCRBY', KEYS[3], 'agreement:agreed', tonumber(ARGV[12]))
  redis.call('HINCRBY', KEYS[3], 'agreement:groups', 1)
end
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

    def find_duplicate(self, source: str, idempotency_key: str) -> AppendResult | None:
        """The acknowledgement of an earlier submission from ``source`` with this key, if there was one."""
        if not idempotency_key:
            return None
        prior = self.redis.get(keys.idempotency_key(source, idempotency_key))
        return None if prior is None else _duplicate(prior)

    def append(self, entry: RankingEntry, idempotency_key: str = "") -> AppendResult:
        """Add one ranking; with an idempotency key already used, return the first acknowledgement.

        A named person ranks a group once: a second human ranking of the group by the same
        ``annotator_id`` (under another idempotency key) raises ``AlreadyRankedError``. The group's
        record, where it exists, is copied into the entry in the same script. Anonymous
        rankings (no annotator_id) and the AI labeler's (idempotent per judge) are not limited here.
        """
        other_source = SOURCE_AI if entry.source == SOURCE_HUMAN else SOURCE_HUMAN
        ids_json = json.dumps(list(entry.completion_ids))
        once_per = entry.annotator_id if entry.source == SOURCE_HUMAN else ""
        args: list[str] = ["1" if idempotency_key else "0", str(self.idempotency_ttl_seconds),
                           str(self.group_ttl_seconds), entry.source, other_source, ids_json, entry.ranking_id,
                           once_per, GROUP_RECORD_FIELD]
        expected_other = self.redis.hget(keys.group_rankings_key(entry.group_id), other_source)
        expected = pairwise_agreement(json.loads(text(expected_other)), list(entry.completion_ids)) \
            if expected_other else None
        args += [text(expected_other) if expected_other else "", str(expected.pairs if expected else 0),
                 str(expected.agreed_pairs if expected else 0)]
        for name, value in entry.to_fields().items():
            args += [name, value]
        script_keys = [self.stream, keys.group_rankings_key(entry.group_id), RANKINGS_STATS_KEY,
                       keys.idempotency_key(entry.source, idempotency_key or "-"),
                       keys.group_annotators_key(entry.group_id), keys.group_key(entry.group_id)]
        status, entry_id, other = self._append(keys=script_keys, args=args)
        if text(status) == "duplicate":
            return _duplicate(entry_id)
        if text(status) == "already_ranked":
            raise AlreadyRankedError(entry.group_id, entry.annotator_id)

        agreement = None
        if text(other) and expected is not None and text(other) == text(expected_other):
            agreement = expected  # counted by the script
        elif text(other):  # the other ranking changed between our read and the script: count it now
            agreement = pairwise_agreement(json.loads(text(other)), list(entry.completion_ids))
            pipe = self.redis.pipeline(transaction=True)
            pipe.hincrby(RANKINGS_STATS_KEY, "agreement:pairs", agreement.pairs)
            pipe.hincrby(RANKINGS_STATS_KEY, "agreement:agreed", agreement.agreed_pairs)
            pipe.hincrby(RANKINGS_STATS_KEY, "agreement:groups", 1)
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
        pipe.xlen(DEAD_LETTER_STREAM)
        pipe.hgetall(RANKINGS_STATS_KEY)
        length, dead, counters = pipe.execute()
        counters = {k: int(v) for k, v in text_dict(counters).items()}
        return StreamStats(
            length=int(length),
            dead_letter_length=int(dead),
            rankings={s: counters.get("rankings:" + s, 0) for s in SOURCES},
            consumer_groups=self.consumer_groups(),
            agreement=Agreement(counters.get("agreement:agreed", 0), counters.get("agreement:pairs", 0)),
            agreement_groups=counters.get("agreement:groups", 0),
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
                bounds.append(entry_id_order(text(oldest)))
            else:
                ms, seq = entry_id_order(g.last_delivered_id)
                bounds.append((ms, seq + 1))
        ms, seq = min(bounds)
        return int(self.redis.xtrim(self.stream, minid=f"{ms}-{seq}", approximate=False))


def entry_id_order(entry_id: str) -> tuple[int, int]:
    """A stream entry id ("ms-seq") as a tuple that sorts like the stream does."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _duplicate(prior: bytes | str) -> AppendResult:
    ranking_id, _, entry_id = text(prior).partition(" ")
    return AppendResult(ranking_id, entry_id, True)


def with_group_records(client: redis.Redis, entries: list[tuple[str, dict]]
                       ) -> list[tuple[str, dict, bytes | str | None]]:
    """(entry id, fields, record of the group it ranks) for each entry: the live record, else the
    copy the entry carries, None when neither (an entry from before copies whose group expired).
    The one join of a ranking with its group, so the trainers and the export use the same rankings."""
    records = GroupStore(client).records([text_dict(f).get("group_id", "") for _, f in entries])
    return [(entry_id, fields, live if live is not None else text_dict(fields).get(GROUP_RECORD_FIELD))
            for (entry_id, fields), live in zip(entries, records)]


def scan_rankings(client: redis.Redis, since_id: str = "-", stream: str = RANKINGS_STREAM,
                  batch: int = SCAN_BATCH) -> Iterator[tuple[str, dict, bytes | str | None]]:
    """Every entry from ``since_id`` on, oldest first, joined by ``with_group_records``. Read with
    XRANGE, not through a consumer group: it acknowledges nothing and moves no trainer's position."""
    start = since_id
    while True:
        entries = [(text(entry_id), fields) for entry_id, fields in client.xrange(stream, start, "+", count=batch)]
        if not entries:
            return
        yield from with_group_records(client, entries)
        start = "(" + entries[-1][0]


@dataclass
class StreamBatch(Generic[T]):
    """What one run read: what it made of each usable ranking and every entry id it must acknowledge."""

    rankings: list[T]
    entry_ids: list[str]
    skipped: dict[str, str]
    """entry id → why it was not usable (malformed, group gone); already moved to the dead-letter
    stream and acknowledged there."""

    @property
    def first_id(self) -> str:
        return min(self.entry_ids, key=entry_id_order) if self.entry_ids else ""

    @property
    def last_id(self) -> str:
        return max(self.entry_ids, key=entry_id_order) if self.entry_ids else ""


_DEAD_LETTER_SCRIPT = """
-- KEYS: stream, dead-letter stream; ARGV: group, entry id, then the dead entry's field/value pairs
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
return redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
"""


class RankingStreamReader:
    """One consumer of a consumer group of the rankings stream (XREADGROUP / XAUTOCLAIM / XACK)."""

    def __init__(self, client: redis.Redis, stream: str = RANKINGS_STREAM,
                 group: str = REWARD_MODEL_CONSUMER_GROUP, consumer: str | None = None,
                 claim_idle_seconds: float = 0.0, dead_letter_stream: str = DEAD_LETTER_STREAM) -> None:
        self.client = client
        self.stream = stream
        self.group = group
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.claim_idle_seconds = claim_idle_seconds
        """An entry pending this long with another consumer is taken over (the feedback section's
        ``rankings_claim_idle_seconds``); 0 takes every pending one, right for a run under a fenced lock."""
        self.dead_letter_stream = dead_letter_stream
        self._dead_letter = client.register_script(_DEAD_LETTER_SCRIPT)

    def ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def waiting(self, at_most: int) -> int:
        """How many entries wait for this group (new ones plus unacknowledged ones), up to ``at_most``."""
        self.ensure_group()
        pending = int(self.client.xpending(self.stream, self.group)["pending"])
        info = {text(g["name"]): g for g in self.client.xinfo_groups(self.stream)}
        last = text(info[self.group]["last-delivered-id"])
        if pending >= at_most:
            return pending
        fresh = self.client.xrange(self.stream, min="(" + last, max="+", count=at_most - pending)
        return pending + len(fresh)

    def claim(self, max_entries: int) -> list[tuple[str, dict]]:
        """Entries left pending at least ``claim_idle_seconds`` (by dead runs), then new ones."""
        self.ensure_group()
        entries: list[tuple[str, dict]] = []
        cursor = "0-0"
        while len(entries) < max_entries:
            result = self.client.xautoclaim(self.stream, self.group, self.consumer,
                                            min_idle_time=int(self.claim_idle_seconds * 1000), start_id=cursor,
                                            count=min(CLAIM_BATCH, max_entries - len(entries)))
            cursor, claimed = text(result[0]), result[1]
            entries += [(text(i), f) for i, f in claimed if f]
            if cursor == "0-0":
                break
        if len(entries) < max_entries:
            read = self.client.xreadgroup(self.group, self.consumer, {self.stream: ">"},
                                          count=max_entries - len(entries))
            for _stream, items in read or []:
                entries += [(text(i), f) for i, f in items]
        return entries

    def read(self, max_entries: int, use: Callable[[str, RankingEntry, CompletionGroup], T]) -> StreamBatch[T]:
        """Claim entries and join each with its group record: ``use(entry_id, ranking, group)``
        makes what the caller trains on, raising ValueError (or KeyError, TypeError) for a ranking
        it cannot use. An unusable entry goes to the dead-letter stream (and is acknowledged)."""
        entries = self.claim(max_entries)
        rankings, skipped = [], {}
        for entry_id, fields, raw in with_group_records(self.client, entries):
            if raw is None:
                skipped[entry_id] = "group record expired or missing (and the entry carries no copy)"
                continue
            try:
                rankings.append(use(entry_id, RankingEntry.from_fields(fields), CompletionGroup.from_json(raw)))
            except (ValueError, KeyError, TypeError) as exc:
                skipped[entry_id] = f"malformed: {exc}"
        by_id = dict(entries)
        for entry_id, why in skipped.items():
            self.dead_letter(entry_id, by_id[entry_id], why)
        if skipped:
            log.warning("%d ranking entries not usable, moved to %s: %s", len(skipped), self.dead_letter_stream,
                        sorted(set(skipped.values())))
        return StreamBatch(rankings=rankings, entry_ids=[i for i, _ in entries], skipped=skipped)

    def dead_letter(self, entry_id: str, fields: dict, why: str) -> None:
        """Copy an entry to the dead-letter stream with why and where it came from, and acknowledge
        it, in one script: it is never lost between the two."""
        dead = {text(k): text(v) for k, v in fields.items()} | {
            "dead_reason": why, "dead_entry_id": entry_id, "dead_stream": self.stream, "dead_group": self.group}
        args: list[str] = [self.group, entry_id]
        for name, value in dead.items():
            args += [name, value]
        self._dead_letter(keys=[self.stream, self.dead_letter_stream], args=args)

    def acknowledge(self, entry_ids: list[str]) -> int:
        if not entry_ids:
            return 0
        return int(self.client.xack(self.stream, self.group, *entry_ids))
