"""Rankings for the reward model: what a run trains on, built from a stream entry joined with the
served group it ranks, and the durable replay store.

The stream and the group record are contracts (``flywheel.contracts.rankings``,
``flywheel.contracts.groups``), read through ``flywheel.rankings_stream.RankingStreamReader``.
A served group expires after a TTL, so a run copies the texts it uses into ``ReplayStore``
(JSONL in the data dir, fsynced) before it acknowledges the entries, and later runs replay from
there.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flywheel.contracts.groups import CompletionGroup
from flywheel.contracts.rankings import MIN_RANKED, SOURCE_AI, RankingEntry


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
    completion_ids: list[str] = field(default_factory=list)
    """The ranked completions' ids, best first, as ``completions`` (empty in rankings stored before
    they were kept): what joins a ranking to its group's samples and their token ids."""

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


def ranking_from_entry(entry_id: str, entry: RankingEntry, group: CompletionGroup) -> Ranking:
    """The ranking a run trains on: the group's prompt and the ranked completions' texts, best
    first. Raises ValueError for a ranking its group cannot back."""
    order = entry.completion_ids
    texts = {c.completion_id: c.text for c in group.completions}
    unknown = [cid for cid in order if cid not in texts]
    if unknown:
        raise ValueError(f"ranking {entry.ranking_id} names completions not in its group: {unknown}")
    if len(order) < MIN_RANKED:
        raise ValueError(f"ranking {entry.ranking_id} ranks fewer than {MIN_RANKED} completions")
    position = {cid: i for i, cid in enumerate(order)}
    pair_probabilities = []
    if entry.source == SOURCE_AI:
        for a, b, p in entry.pair_probabilities:
            if a in position and b in position:
                pair_probabilities.append((position[a], position[b], p))
    return Ranking(
        ranking_id=entry.ranking_id or entry_id, group_id=entry.group_id, prompt=group.prompt,
        completions=[texts[cid] for cid in order], source=entry.source, pair_probabilities=pair_probabilities,
        stream_id=entry_id, policy_version=str(entry.policy_version), created_at=repr(entry.created_at),
        completion_ids=list(order),
    )


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
