"""How far two rankings of the same group agree, pair by pair.

Used to measure the AI labeler against people: for every pair of completions that both rankings
order, the pair agrees when both put the same one first. The fraction of agreeing pairs is the
number Lee et al. (2023) and InstructGPT report as labeler agreement.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass


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
