"""Rankings for the reward model: reading them from the feedback stream, joining them with the
served group they rank, the held-out split, and the durable replay store.

Contract (shared with ``feedback``): the stream ``flywheel:rankings`` holds one entry per ranking
(fields: ranking_id, group_id, completion_ids as a JSON list best first, source "human" | "ai",
pair_probabilities for AI as JSON [[id_a, id_b, P(a ≻ b)], ...], ...); the served group is the
JSON at ``flywheel:group:{group_id}`` (prompt, completions [{completion_id, text, ...}]) and
expires after a TTL. So a run copies the texts it uses into ``ReplayStore`` (JSONL in the data
dir, fsynced) before it acknowledges the entries, and later runs replay from there.

The reader is the ``reward-model`` consumer group. Only one reward-model run exists at a time (a
Redis lock), so every entry pending at the start of a run belongs to a run that died before it
acknowledged: ``claim`` takes them all back with XAUTOCLAIM, then reads new ones with XREADGROUP.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path

import redis as redis_lib

log = logging.getLogger(__name__)

RANKINGS_STREAM = "flywheel:rankings"
GROUP_KEY = "flywheel:group:{group_id}"
REWARD_MODEL_CONSUMER_GROUP = "reward-model"


@dataclass
class Ranking:
    """One ranked group, self-contained: the prompt and the completion texts, best first."""

    ranking_id: str
    group_id: str
    prompt: str
    completions: list[str]
    source: str = "human"
    pair_probabilities: list[tuple[int, int, float]] = field(default_factory=list)
    """AI only: (index a, index b, P(a ≻ b)) with indices into ``completions``."""
    stream_id: str = ""
    policy_version: str = ""
    created_at: str = ""

    @property
    def k(self) -> int:
        return len(self.completions)

    @property
    def n_pairs(self) -> int:
        return self.k * (self.k - 1) // 2

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> "Ranking":
        data = json.loads(line)
        data["pair_probabilities"] = [tuple(p) for p in data.get("pair_probabilities", [])]
        return cls(**data)


def is_held_out(group_id: str, fraction: float) -> bool:
    """Whether a group belongs to the held-out slice: a hash of its id, so it never changes and a
    group (all its rankings) is either always evaluated on or always trained on."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(group_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def ranking_from_entry(stream_id: str, fields: dict, group: dict) -> Ranking:
    """Join a stream entry with its served group record (both per the shared contract)."""
    fields = {_text(k): _text(v) for k, v in fields.items()}
    order = json.loads(fields["completion_ids"])
    texts = {c["completion_id"]: c["text"] for c in group["completions"]}
    unknown = [cid for cid in order if cid not in texts]
    if unknown:
        raise ValueError(f"ranking {fields.get('ranking_id')} names completions not in its group: {unknown}")
    if len(order) < 2:
        raise ValueError(f"ranking {fields.get('ranking_id')} ranks fewer than 2 completions")
    position = {cid: i for i, cid in enumerate(order)}
    pair_probabilities = []
    if fields.get("source") == "ai" and fields.get("pair_probabilities"):
        for a, b, p in json.loads(fields["pair_probabilities"]):
            if a in position and b in position:
                pair_probabilities.append((position[a], position[b], float(p)))
    return Ranking(
        ranking_id=fields.get("ranking_id") or stream_id, group_id=fields["group_id"], prompt=group["prompt"],
        completions=[texts[cid] for cid in order], source=fields.get("source", "human") or "human",
        pair_probabilities=pair_probabilities, stream_id=stream_id,
        policy_version=fields.get("policy_version", ""), created_at=fields.get("created_at", ""),
    )


@dataclass
class StreamBatch:
    """What one run read: the rankings it can train on and every stream id it must acknowledge."""

    rankings: list[Ranking]
    entry_ids: list[str]
    skipped: dict[str, str]
    """stream id → why it was not usable (group expired, malformed); acknowledged with the rest."""

    @property
    def first_id(self) -> str:
        return min(self.entry_ids, key=_id_key) if self.entry_ids else ""

    @property
    def last_id(self) -> str:
        return max(self.entry_ids, key=_id_key) if self.entry_ids else ""


def _id_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


class RankingStreamReader:
    """The reward-model consumer of ``flywheel:rankings`` (XREADGROUP / XAUTOCLAIM / XACK)."""

    def __init__(self, client: redis_lib.Redis, stream: str = RANKINGS_STREAM,
                 group: str = REWARD_MODEL_CONSUMER_GROUP, consumer: str | None = None) -> None:
        self.client = client
        self.stream = stream
        self.group = group
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"

    def ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis_lib.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def waiting(self, at_most: int) -> int:
        """How many entries wait for this group (new ones plus unacknowledged ones), up to ``at_most``."""
        self.ensure_group()
        pending = int(self.client.xpending(self.stream, self.group)["pending"])
        info = {_text(g["name"]): g for g in self.client.xinfo_groups(self.stream)}
        last = _text(info[self.group]["last-delivered-id"])
        if pending >= at_most:
            return pending
        fresh = self.client.xrange(self.stream, min="(" + last, max="+", count=at_most - pending)
        return pending + len(fresh)

    def claim(self, max_entries: int) -> list[tuple[str, dict]]:
        """Entries left pending by dead runs (all of them: only one run exists), then new ones."""
        self.ensure_group()
        entries: list[tuple[str, dict]] = []
        cursor = "0-0"
        while len(entries) < max_entries:
            result = self.client.xautoclaim(self.stream, self.group, self.consumer, min_idle_time=0,
                                            start_id=cursor, count=min(256, max_entries - len(entries)))
            cursor, claimed = _text(result[0]), result[1]
            entries += [(_text(i), f) for i, f in claimed if f]
            if cursor == "0-0":
                break
        if len(entries) < max_entries:
            read = self.client.xreadgroup(self.group, self.consumer, {self.stream: ">"},
                                          count=max_entries - len(entries))
            for _stream, items in read or []:
                entries += [(_text(i), f) for i, f in items]
        return entries

    def read(self, max_entries: int) -> StreamBatch:
        """Claim entries and join each with its group record."""
        entries = self.claim(max_entries)
        rankings, skipped = [], {}
        keys = [GROUP_KEY.format(group_id=_text(f.get(b"group_id", f.get("group_id", "")))) for _, f in entries]
        groups = self.client.mget(keys) if keys else []
        for (stream_id, fields), raw in zip(entries, groups):
            if raw is None:
                skipped[stream_id] = "group record expired or missing"
                continue
            try:
                rankings.append(ranking_from_entry(stream_id, fields, json.loads(raw)))
            except (ValueError, KeyError, TypeError) as exc:
                skipped[stream_id] = f"malformed: {exc}"
        if skipped:
            log.warning("%d ranking entries not usable (acknowledged anyway): %s", len(skipped),
                        sorted(set(skipped.values())))
        return StreamBatch(rankings=rankings, entry_ids=[i for i, _ in entries], skipped=skipped)

    def acknowledge(self, entry_ids: list[str]) -> int:
        if not entry_ids:
            return 0
        return int(self.client.xack(self.stream, self.group, *entry_ids))


class ReplayStore:
    """Every ranking a run has used, as JSONL, so later runs can replay it after its group expired.

    Appends are fsynced before the stream entries are acknowledged; an entry read twice (a run that
    died after writing here but before acknowledging) is kept once, by ranking id.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, rankings: list[Ranking]) -> None:
        if not rankings:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torn = False
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as tail:
                tail.seek(-1, os.SEEK_END)
                torn = tail.read(1) != b"\n"
        with open(self.path, "a", encoding="utf-8") as handle:
            if torn:  # a writer killed mid-line: start on a fresh line
                handle.write("\n")
            for ranking in rankings:
                handle.write(ranking.to_json() + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def load(self) -> list[Ranking]:
        if not self.path.exists():
            return []
        by_id: dict[str, Ranking] = {}
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                line = line.strip()
                if not line:
                    continue
                try:
                    ranking = Ranking.from_json(line)
                except (ValueError, TypeError):  # a torn last line of a killed writer
                    continue
                by_id.setdefault(ranking.ranking_id, ranking)
        return list(by_id.values())


def sample_replay(stored: list[Ranking], exclude: set[str], size: int, rng: random.Random) -> list[Ranking]:
    """A uniform sample of older training rankings, so a run on new data does not forget old data."""
    candidates = [r for r in stored if r.ranking_id not in exclude]
    return rng.sample(candidates, min(size, len(candidates)))
