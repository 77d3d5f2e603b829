"""A ranking as it travels on the rankings stream, and how far two rankings of one group agree.

Every field of a stream entry is a string: ranking_id, group_id, completion_ids (a JSON list, best
first), source ("human" | "ai"), annotator_id, comment, policy_version, created_at; an AI ranking
adds judge_id, pair_probabilities (JSON ``[[id_a, id_b, P(a ≻ b)], ...]``) and confidence. The
feedback service and the labeler write entries with ``to_fields``; the trainers read them with
``from_fields``. The append script adds ``GROUP_RECORD_FIELD``, a copy of the ranked group's record,
so a ranking outlives its served group.

Agreement is counted pair by pair: for every pair of completions that both rankings order, the
pair agrees when both put the same one first. The fraction of agreeing pairs is the number Lee
et al. (2023) and InstructGPT report as labeler agreement; the stream keeps its running counts.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from dataclasses import dataclass, field

from flywheel.contracts.redis_text import text_dict

SOURCE_HUMAN = "human"
SOURCE_AI = "ai"
SOURCES = (SOURCE_HUMAN, SOURCE_AI)

GROUP_RECORD_FIELD = "group_record"  # the ranked group's record, copied into the entry at acceptance

MIN_RANKED = 2
MAX_RANKED = 9  # InstructGPT asks labelers to rank K = 4..9


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
class Agreement:
    agreed_pairs: int
    pairs: int

    @property
    def ratio(self) -> float:
        return self.agreed_pairs / self.pairs if self.pairs else 0.0


def pairwise_agreement(first: list[str], second: list[str]) -> Agreement:
    """Pairs ordered alike by two best-first rankings, over the completions both ranked."""
    rank_first = {cid: i for i, cid in enumerate(first)}
    rank_second = {cid: i for i, cid in enumerate(second)}
    shared = [cid for cid in first if cid in rank_second]
    agreed = pairs = 0
    for a, b in itertools.combinations(shared, 2):
        pairs += 1
        agreed += (rank_first[a] < rank_first[b]) == (rank_second[a] < rank_second[b])
    return Agreement(agreed, pairs)
