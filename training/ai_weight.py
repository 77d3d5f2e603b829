"""How much an AI-labelled ranking counts in reward-model training: as much as the judge has
been seen to agree with people.

The rule. Let a be the measured AI-human agreement (the fraction of completion pairs that a
person and the AI labeler ordered alike, over every group both ranked: the rankings stream's
counts, ``flywheel.contracts.rankings.pairwise_agreement``) and g the number of such groups. Then

    weight = max_weight · clip(2a − 1, 0, 1)    when g ≥ min_groups,   else 0.

2a − 1 is the judge's agreement above chance, scaled to [0, 1]: a judge at chance (a = 0.5) or
worse gets 0, one that agrees on 80% of the pairs gets 0.6 · max_weight, one that always agrees
gets max_weight (``reward_model_ai_weight``, relative to a human ranking's 1). Below
``min_groups`` overlapping groups the figure is not trusted yet and AI rankings get no weight, so
a new judge earns its weight from people before it shapes the reward model. (If a judge's verdicts
are a person's flipped with probability 1 − a, 2a − 1 is the expected sign agreement of one
pairwise label with the person's: the label's worth relative to a human one.)

The weight multiplies the loss of every pair of an AI ranking (``training.reward_trainer``'s
collator); nothing else in training changes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

RULE = "max_weight * clip(2 * agreement - 1, 0, 1) when overlap_groups >= min_groups, else 0"


@dataclass(frozen=True)
class AIWeight:
    weight: float
    agreement: float | None  # None: no pair ranked by both yet
    agreed_pairs: int
    pairs: int
    overlap_groups: int
    min_groups: int
    max_weight: float
    why: str

    def to_dict(self) -> dict:
        return asdict(self) | {"rule": RULE}


def ai_ranking_weight(agreed_pairs: int, pairs: int, overlap_groups: int, *, max_weight: float,
                      min_groups: int) -> AIWeight:
    """The weight of an AI ranking under the rule of the module docstring, with the reason."""
    agreement = agreed_pairs / pairs if pairs else None
    figures = dict(agreement=agreement, agreed_pairs=agreed_pairs, pairs=pairs, overlap_groups=overlap_groups,
                   min_groups=min_groups, max_weight=max_weight)
    if agreement is None or overlap_groups < min_groups:
        return AIWeight(0.0, why=f"{overlap_groups} groups ranked by both a person and the AI labeler, fewer than "
                                 f"{min_groups}: agreement not trusted yet", **figures)
    weight = max_weight * min(max(2.0 * agreement - 1.0, 0.0), 1.0)
    return AIWeight(weight, why=f"agreement {agreement:.3f} over {pairs} pairs in {overlap_groups} groups", **figures)
