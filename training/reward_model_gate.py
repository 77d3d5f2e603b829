"""The gate a reward-model candidate passes before it is promoted.

On the held-out rankings (never trained on; the same ones for both), the candidate's pairwise
accuracy may be at most ``margin`` below the current version's. A small margin lets the reward
model follow a shift in what people prefer without being demoted for noise on a small held-out
set. The first version, or one with no held-out rankings to compare on yet, is promoted: there is
nothing it could be worse than.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from training.reward_trainer import EvalStats


@dataclass
class RewardModelGateDecision:
    passed: bool
    why: str
    figures: dict = field(default_factory=dict)
    """Nothing of its own: the run's held-out figures already are the evidence."""


def reward_model_gate_decision(candidate: EvalStats, current: EvalStats | None, current_version: int | None,
                               margin: float) -> RewardModelGateDecision:
    """Promote unless ``candidate`` is worse than ``current`` (version ``current_version``, None
    when there is none) by more than ``margin`` held-out accuracy."""
    if current_version is None:
        return RewardModelGateDecision(True, "first reward model")
    if current is None or current.accuracy is None or candidate.accuracy is None:
        return RewardModelGateDecision(True, "no held-out rankings to compare on yet")
    if candidate.accuracy >= current.accuracy - margin:
        return RewardModelGateDecision(True, f"held-out accuracy {candidate.accuracy:.4f} vs current "
                                             f"v{current_version} {current.accuracy:.4f} (margin {margin})")
    return RewardModelGateDecision(False, f"held-out accuracy {candidate.accuracy:.4f} is worse than current "
                                          f"v{current_version} {current.accuracy:.4f} by more than {margin}")
