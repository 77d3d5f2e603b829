"""The gate a reward-model candidate passes before it is promoted: evidence that it learned what
people prefer, not just a number.

A version has two members, each trained on its own half of the groups (``policy``: the reward PPO
optimises; ``judge``: what the policy gate measures with). Each member is evaluated on rankings it
never trained on: the held-out groups plus the other member's half (cross-fitting, so the
evaluation set is most of the data rather than a tenth of it), on the human rankings when there
are any. Both members must pass:

- better than chance: the lower bound of the 95% interval of its pairwise accuracy (over
  rankings, the independent unit: ``training.evidence.clustered_accuracy``) must exceed
  ``min_accuracy`` (0.5 by default). Rankings made at random cannot pass this, so the random
  control never gets a reward model, and so never a policy;
- not worse than the current version's same member on the same rankings by more than ``margin``
  (a small margin lets the model follow a shift in what people prefer without being demoted for
  noise).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from training.reward_trainer import EvalStats


@dataclass
class RewardModelGateDecision:
    passed: bool
    why: str
    figures: dict = field(default_factory=dict)


def reward_model_gate_decision(candidate: dict[str, EvalStats], current: dict[str, EvalStats] | None,
                               current_version: int | None, margin: float,
                               min_accuracy: float = 0.5) -> RewardModelGateDecision:
    """``candidate`` and ``current`` map each member to its evaluation (``current`` None when
    there is no current version to compare with)."""
    failures, reasons, figures = [], [], {}
    for member, stats in candidate.items():
        interval = stats.accuracy_interval()
        figures |= {f"{member}_accuracy_low": interval.low, f"{member}_accuracy_high": interval.high,
                    f"{member}_heldout_rankings": interval.units}
        said = f"{member} {interval.mean:.3f} (95% CI {interval.low:.3f}-{interval.high:.3f}, {interval.units} " \
               f"{stats.judged_on} rankings)"
        if not interval.above(min_accuracy):
            failures.append(f"{said} is not above {min_accuracy}")
            continue
        before = (current or {}).get(member)
        if current_version is not None and before is not None and before.accuracy is not None:
            if stats.accuracy < before.accuracy - margin:
                failures.append(f"{member} {stats.accuracy:.4f} is worse than current v{current_version}'s "
                                f"{before.accuracy:.4f} by more than {margin}")
                continue
            said += f" vs current v{current_version} {before.accuracy:.3f}"
        reasons.append(said)
    if failures:
        return RewardModelGateDecision(False, "held-out accuracy: " + "; ".join(failures), figures)
    return RewardModelGateDecision(True, "held-out accuracy: " + "; ".join(reasons), figures)
