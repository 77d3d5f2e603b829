"""The evaluation gate a PPO candidate passes before it serves.

On the held-out prompts (never trained on) and a held-out text corpus, compare the candidate with
the current policy:

- reward gain: mean reward-model score of the candidate's responses minus the current policy's
  (same prompts, same sampling seed) must be at least ``min_reward_gain``;
- KL to π_ref: mean Σ_t log π(y_t) − log π_ref(y_t) over the candidate's responses (sampled, and
  their log-probs taken, at PPO's rollout temperature) must stay under
  ``kl_budget`` nats (the policy may not wander off the distribution the reward model knows);
- alignment tax (InstructGPT §4.2): perplexity on held-out text may be at most
  (1 + ``perplexity_margin``) × π_ref's;
- every figure and every trained parameter finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from training.policy_model import PolicyWithValueHead, Prompt
from training.ppo import RewardFunction, token_logprobs


@dataclass
class PolicyGateConfig:
    min_reward_gain: float = 0.0
    kl_budget: float = 10.0
    perplexity_margin: float = 0.05
    response_length: int = 48
    temperature: float = 1.0
    """τ the responses are sampled at, and their log-probs (the KL) taken at: PPO's rollout τ."""
    max_prompt_length: int = 256
    batch_size: int = 32
    seed: int = 1234


@dataclass
class PolicyEvaluation:
    mean_score: float
    kl_to_ref: float
    perplexity: float


@torch.no_grad()
def evaluate_policy(policy: PolicyWithValueHead, reward_fn: RewardFunction, prompts: Sequence[Prompt],
                    text_batches: list, config: PolicyGateConfig) -> PolicyEvaluation:
    """Mean score and KL to π_ref of sampled responses (seeded: the same draws for every policy
    evaluated), and perplexity on the text batches. A policy with a non-finite weight cannot even
    be sampled from: its figures are NaN (and the gate rejects it)."""
    if not policy.all_finite():
        return PolicyEvaluation(float("nan"), float("nan"), float("nan"))
    generator = torch.Generator().manual_seed(config.seed)
    scores, kls = [], []
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
        response_ids = [row[:int(n)].tolist() for row, n in zip(responses, mask.sum(dim=1))]
        scores.append(reward_fn([list(p.token_ids[-config.max_prompt_length:]) for p in chunk], response_ids).float())
    return PolicyEvaluation(mean_score=float(torch.cat(scores).mean()) if scores else float("nan"),
                            kl_to_ref=float(torch.cat(kls).mean()) if kls else float("nan"),
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


def gate_decision(candidate: PolicyEvaluation, current: PolicyEvaluation, reference_perplexity: float,
                  parameters_finite: bool, config: PolicyGateConfig) -> GateDecision:
    figures = {
        "reward_gain": candidate.mean_score - current.mean_score,
        "mean_score": candidate.mean_score,
        "current_mean_score": current.mean_score,
        "kl_to_ref": candidate.kl_to_ref,
        "current_kl_to_ref": current.kl_to_ref,
        "perplexity": candidate.perplexity,
        "reference_perplexity": reference_perplexity,
        "perplexity_ratio": candidate.perplexity / reference_perplexity if reference_perplexity else float("nan"),
    }
    failures = []
    if not parameters_finite or not all(math.isfinite(v) for v in figures.values()):
        failures.append("non-finite parameters or figures (NaN/inf)")
    else:
        if figures["reward_gain"] < config.min_reward_gain:
            failures.append(f"reward gain {figures['reward_gain']:.4f} < {config.min_reward_gain}")
        if figures["kl_to_ref"] > config.kl_budget:
            failures.append(f"KL to π_ref {figures['kl_to_ref']:.3f} > budget {config.kl_budget}")
        if figures["perplexity_ratio"] > 1 + config.perplexity_margin:
            failures.append(f"perplexity {figures['perplexity_ratio']:.4f}× π_ref's > 1 + {config.perplexity_margin}")
    # JSON has no NaN/inf: record them as strings so the manifest stays valid JSON
    figures = {k: (v if math.isfinite(v) else repr(v)) for k, v in figures.items()}
    if failures:
        return GateDecision(False, "; ".join(failures), figures)
    return GateDecision(True, (f"reward gain {figures['reward_gain']:+.4f}, KL {figures['kl_to_ref']:.3f} nats, "
                               f"perplexity ratio {figures['perplexity_ratio']:.4f}"), figures)
