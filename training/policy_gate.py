"""The evaluation gate a PPO candidate passes before it serves: evidence, not a coin flip.

On the held-out prompts (a hash slice of the served prompts that PPO never trains on), the
candidate and the current policy each answer every prompt ``samples_per_prompt`` times; sample j
of both is drawn from the same seed (a fresh seed every run, recorded in the manifest), so the two
policies' answers are paired. Every answer is scored by both members of the reward model,
calibrated (mean 0, std 1 over served completions):

- ``policy``: the member PPO optimised;
- ``judge``: the member trained on the other half of the groups, which PPO never optimised against.

The decision rests on the judge: the candidate is promoted only when the lower bound of the 95%
confidence interval of its per-prompt mean gain over the current policy (``training.evidence``)
is above ``min_reward_gain``. The policy member's gain is recorded beside it: a gain on the member
PPO optimised and none on the judge is reward over-optimisation, and is rejected. Then, as before:

- KL to π_ref: mean Σ_t log π(y_t) − log π_ref(y_t) over the candidate's responses (sampled, and
  their log-probs taken, at PPO's rollout temperature) must stay under ``kl_budget`` nats;
- alignment tax (InstructGPT §4.2): perplexity on held-out text may be at most
  (1 + ``perplexity_margin``) × π_ref's;
- every figure and every trained parameter finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from flywheel.contracts.artifacts import JUDGE_MEMBER, POLICY_MEMBER
from training.evidence import Interval, paired_gain
from training.policy_model import PolicyWithValueHead, Prompt
from training.ppo import RewardFunction, token_logprobs
from training.run import json_safe_figures


@dataclass
class PolicyGateConfig:
    min_reward_gain: float = 0.0
    """Least lower bound of the 95% interval of the judge's gain, in calibrated reward units."""
    kl_budget: float = 10.0
    perplexity_margin: float = 0.05
    response_length: int = 48
    temperature: float = 1.0
    """τ the responses are sampled at, and their log-probs (the KL) taken at: PPO's rollout τ."""
    samples_per_prompt: int = 4
    max_prompt_length: int = 256
    batch_size: int = 64
    """Prompts generated together: a whole held-out set of up to 64 in one batch, since a decode
    step's fixed cost dominates at few rows (40 prompts as 32 + 8 cost ~25% more than as 40)."""
    seed: int = 1234
    """Sample j of every prompt is drawn from seed + j, for the candidate and the current policy alike."""


@dataclass
class PolicyEvaluation:
    scores: dict[str, list[list[float]]] = field(default_factory=dict)
    """member -> [prompt][sample] calibrated scores."""
    kl_to_ref: float = math.nan
    perplexity: float = math.nan

    def mean_score(self, member: str) -> float:
        values = [v for row in self.scores.get(member, []) for v in row]
        return sum(values) / len(values) if values else math.nan


@torch.no_grad()
def evaluate_policy(policy: PolicyWithValueHead, scorers: Mapping[str, RewardFunction], prompts: Sequence[Prompt],
                    text_batches: list, config: PolicyGateConfig) -> PolicyEvaluation:
    """Every member's scores of ``samples_per_prompt`` seeded responses per prompt, the mean KL to
    π_ref of those responses and the perplexity on the text batches. A policy with a non-finite
    weight cannot even be sampled from: its figures are NaN (and the gate rejects it)."""
    if not policy.all_finite():
        return PolicyEvaluation()
    scores = {member: [[] for _ in prompts] for member in scorers}
    kls = []
    for sample in range(config.samples_per_prompt):
        generator = torch.Generator().manual_seed(config.seed + sample)
        for start in range(0, len(prompts), config.batch_size):
            chunk = prompts[start:start + config.batch_size]
            query_responses, attention_mask, responses, mask = policy.generate(
                chunk, config.response_length, config.temperature, max_prompt_length=config.max_prompt_length,
                generator=generator)
            logits, _ = policy(query_responses, attention_mask, responses.shape[1])
            ref_logits = policy.reference_logits(query_responses, attention_mask, responses.shape[1])
            kl = (token_logprobs(logits, responses, config.temperature)
                  - token_logprobs(ref_logits, responses, config.temperature)) * mask
            kls.append(kl.sum(dim=1))
            prompt_ids = [list(p.token_ids[-config.max_prompt_length:]) for p in chunk]
            response_ids = [row[:int(n)].tolist() for row, n in zip(responses, mask.sum(dim=1))]
            for member, reward_fn in scorers.items():
                for offset, value in enumerate(reward_fn(prompt_ids, response_ids).float().tolist()):
                    scores[member][start + offset].append(value)
    return PolicyEvaluation(scores=scores, kl_to_ref=float(torch.cat(kls).mean()) if kls else math.nan,
                            perplexity=perplexity(policy, text_batches))


@torch.no_grad()
def perplexity(policy: PolicyWithValueHead, text_batches: list, reference: bool = False) -> float:
    """exp(mean next-token NLL) over all tokens of the batches."""
    total = torch.zeros(2)
    for input_ids, attention_mask in text_batches:
        total += policy.language_model_loss(input_ids, attention_mask, reference=reference, reduction="sum").float()
    return math.exp(float(total[0] / total[1])) if total[1] > 0 else float("nan")


@dataclass
class GateDecision:
    passed: bool
    why: str
    figures: dict


def _gain(candidate: PolicyEvaluation, current: PolicyEvaluation, member: str) -> Interval:
    if member not in candidate.scores or member not in current.scores:
        return Interval(math.nan, math.nan, math.nan, 0)
    return paired_gain(candidate.scores[member], current.scores[member])


def gate_decision(candidate: PolicyEvaluation, current: PolicyEvaluation, reference_perplexity: float,
                  parameters_finite: bool, config: PolicyGateConfig) -> GateDecision:
    judge = _gain(candidate, current, JUDGE_MEMBER)
    optimised = _gain(candidate, current, POLICY_MEMBER)
    figures = {
        "reward_gain": judge.mean,  # the judge's: what the decision rests on
        "reward_gain_low": judge.low,
        "reward_gain_high": judge.high,
        "policy_member_gain": optimised.mean,
        "policy_member_gain_low": optimised.low,
        "policy_member_gain_high": optimised.high,
        "mean_score": candidate.mean_score(JUDGE_MEMBER),
        "current_mean_score": current.mean_score(JUDGE_MEMBER),
        "kl_to_ref": candidate.kl_to_ref,
        "current_kl_to_ref": current.kl_to_ref,
        "perplexity": candidate.perplexity,
        "reference_perplexity": reference_perplexity,
        "perplexity_ratio": candidate.perplexity / reference_perplexity if reference_perplexity else math.nan,
        "heldout_prompts": float(judge.units),
        "samples_per_prompt": float(config.samples_per_prompt),
    }
    failures = []
    if not parameters_finite or not all(math.isfinite(v) for v in figures.values()):
        failures.append("non-finite parameters or figures (NaN/inf)")
    else:
        if not judge.above(config.min_reward_gain):
            failures.append(f"judge's reward gain {judge.describe()} does not exceed {config.min_reward_gain} "
                            f"(the member PPO optimised: {optimised.describe()})")
        if figures["kl_to_ref"] > config.kl_budget:
            failures.append(f"KL to π_ref {figures['kl_to_ref']:.3f} > budget {config.kl_budget}")
        if figures["perplexity_ratio"] > 1 + config.perplexity_margin:
            failures.append(f"perplexity {figures['perplexity_ratio']:.4f}× π_ref's > 1 + {config.perplexity_margin}")
    figures = json_safe_figures(figures)
    if failures:
        return GateDecision(False, "; ".join(failures), figures)
    return GateDecision(True, (f"judge's reward gain {judge.describe()} > {config.min_reward_gain} (the member PPO "
                               f"optimised: {optimised.describe()}), KL {figures['kl_to_ref']:.3f} nats, "
                               f"perplexity ratio {figures['perplexity_ratio']:.4f}"), figures)
