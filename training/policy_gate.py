"""The evaluation gate a PPO candidate passes before it serves: evidence, not a coin flip.

On the held-out prompts (a hash slice of the served prompts that PPO never trains on), the
candidate and the current policy each answer every prompt ``samples_per_prompt`` times; sample j
of both is drawn from the same seed (a fresh seed every run, recorded in the manifest), so the two
policies' answers are paired. Every answer is scored by both members of the reward model,
calibrated (mean 0, std 1 over served completions):

- ``policy``: the member PPO optimised;
- ``judge``: the member trained on the other half of the groups, which PPO never optimised against.

The decision rests on evidence PPO never optimised against, of two kinds; either suffices:

- the judge's gain: the lower bound of the confidence interval of the candidate's per-prompt
  mean gain over the current policy (``training.evidence``) is above ``min_reward_gain``;
- the users' held-out verdict: the rankings of the groups the judge trains on (which PPO never
  learns from, neither as rewards nor as episodes), in the candidate's own terms. For each ranked
  answer y, Δ(y) = log π_candidate(y) − log π_current(y) (at PPO's τ) is how much more the
  candidate would say it than the current policy does (the implicit reward of a KL-regularised
  policy, as in DPO); the verdict is the share of the users' pairs (better, worse) with
  Δ(better) > Δ(worse), with an interval over rankings, and it passes when the lower bound is
  above 1/2. A policy that learned what the users prefer moves towards the answers they preferred
  even among answers it never saw ranked; one that learned a reward model's quirks does not. The
  judge has no veto over it: where the two disagreed, the judge was the one that was wrong (its
  length-neutral score extrapolates its length fit to a candidate that answers shorter).

Two kinds of evidence are two chances: each is a two-sided 97.5% interval (Bonferroni), so under
the null (users who rank at random, a reward model at chance) each passes at most 1.25% of the
time and the two together at most 2.5%, inside the 5% a 95% interval on one of them would allow.
The policy member's gain is recorded beside them: a gain on the member PPO optimised and none on
the judge or the users' rankings is reward over-optimisation, and is rejected. Then, as before:

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
from training.evidence import Interval, clustered_accuracy, paired_gain
from training.policy_model import PolicyWithValueHead, Prompt
from training.ppo import RewardFunction, token_logprobs
from training.run import json_safe_figures


MIN_VERDICT_RANKINGS = 20
"""Fewer held-out rankings give the users' verdict no say: with a handful, all of them ordered right by
chance (1 in 8 for three rankings of two answers) is an interval of zero width at 1.0."""

EVIDENCE_LEVEL = 0.975
"""The level of each of the gate's two intervals (the judge's gain, the users' held-out verdict):
two chances at 1.25% one-sided each, at most 2.5% false promotions together."""


@dataclass
class PolicyGateConfig:
    min_reward_gain: float = 0.0
    """Least lower bound of the interval (``EVIDENCE_LEVEL``) of the judge's gain, in calibrated reward units."""
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


@dataclass(frozen=True)
class RankedAnswers:
    """One held-out ranking for the users' verdict: the prompt's and each ranked answer's token ids,
    the users' best first."""

    prompt_ids: tuple[int, ...]
    answers: tuple[tuple[int, ...], ...]


@dataclass
class PolicyEvaluation:
    scores: dict[str, list[list[float]]] = field(default_factory=dict)
    """member -> [prompt][sample] calibrated scores."""
    kl_to_ref: float = math.nan
    perplexity: float = math.nan
    ranked_logprobs: list[list[float]] = field(default_factory=list)
    """[ranking][answer, best first]: log π(answer) of the held-out rankings' answers (at τ)."""

    def mean_score(self, member: str) -> float:
        values = [v for row in self.scores.get(member, []) for v in row]
        return sum(values) / len(values) if values else math.nan


@torch.no_grad()
def evaluate_policy(policy: PolicyWithValueHead, scorers: Mapping[str, RewardFunction], prompts: Sequence[Prompt],
                    text_batches: list, config: PolicyGateConfig,
                    ranked: Sequence[RankedAnswers] = ()) -> PolicyEvaluation:
    """Every member's scores of ``samples_per_prompt`` seeded responses per prompt, the mean KL to
    π_ref of those responses, the perplexity on the text batches and the log-probs of the
    ``ranked`` answers. A policy with a non-finite weight cannot even be sampled from: its figures
    are NaN (and the gate rejects it)."""
    if not policy.all_finite():
        return PolicyEvaluation()
    scores = {member: [[] for _ in prompts] for member in scorers}
    kls = []
    for sample in range(config.samples_per_prompt):
        generator = torch.Generator(device=policy.device).manual_seed(config.seed + sample)
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
                            perplexity=perplexity(policy, text_batches),
                            ranked_logprobs=answer_logprobs(policy, ranked, config))


@torch.no_grad()
def answer_logprobs(policy: PolicyWithValueHead, ranked: Sequence[RankedAnswers],
                    config: PolicyGateConfig, batch_size: int = 16) -> list[list[float]]:
    """log π(answer | prompt) at τ of every answer of ``ranked``, in batches of similar length."""
    rows = [(r, a, list(ranking.prompt_ids[-config.max_prompt_length:]), list(answer[:config.response_length]))
            for r, ranking in enumerate(ranked) for a, answer in enumerate(ranking.answers)]
    rows = [row for row in rows if row[3]]
    found = [[math.nan] * len(ranking.answers) for ranking in ranked]
    rows.sort(key=lambda row: len(row[2]) + len(row[3]))
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        input_ids, prompt_mask = policy.left_pad([row[2] for row in chunk])
        answers, answer_mask = policy.right_pad([row[3] for row in chunk])
        logits, _ = policy(torch.cat([input_ids, answers], dim=1), torch.cat([prompt_mask, answer_mask], dim=1),
                           answers.shape[1])
        sums = (token_logprobs(logits, answers, config.temperature) * answer_mask).sum(dim=1)
        for (r, a, _, _), value in zip(chunk, sums.tolist()):
            found[r][a] = value
    return found


def users_verdict(candidate: PolicyEvaluation, current: PolicyEvaluation, level: float = EVIDENCE_LEVEL) -> Interval:
    """The share of the held-out rankings' pairs (better, worse) whose Δ = log π_candidate −
    log π_current is larger for the better one (ties half), with its interval over rankings."""
    correct, pairs = [], []
    for mine, theirs in zip(candidate.ranked_logprobs, current.ranked_logprobs):
        delta = [a - b for a, b in zip(mine, theirs)]
        right = total = 0.0
        for i in range(len(delta)):
            for j in range(i + 1, len(delta)):
                if math.isfinite(delta[i]) and math.isfinite(delta[j]):
                    total += 1
                    right += 1.0 if delta[i] > delta[j] else 0.5 if delta[i] == delta[j] else 0.0
        if total:
            correct.append(right)
            pairs.append(int(total))
    return clustered_accuracy(correct, pairs, level)


@torch.no_grad()
def perplexity(policy: PolicyWithValueHead, text_batches: list, reference: bool = False) -> float:
    """exp(mean next-token NLL) over all tokens of the batches."""
    total = torch.zeros(2, device=policy.device)
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
        return Interval(math.nan, math.nan, math.nan, 0, EVIDENCE_LEVEL)
    return paired_gain(candidate.scores[member], current.scores[member], EVIDENCE_LEVEL)


def gate_decision(candidate: PolicyEvaluation, current: PolicyEvaluation, reference_perplexity: float,
                  parameters_finite: bool, config: PolicyGateConfig) -> GateDecision:
    judge = _gain(candidate, current, JUDGE_MEMBER)
    optimised = _gain(candidate, current, POLICY_MEMBER)
    users = users_verdict(candidate, current)
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
    verdict = {  # absent (NaN) without held-out rankings: then the judge alone decides
        "users_verdict": users.mean,
        "users_verdict_low": users.low,
        "users_verdict_high": users.high,
        "users_verdict_rankings": float(users.units),
    }
    failures = []
    if not parameters_finite or not all(math.isfinite(v) for v in figures.values()):
        failures.append("non-finite parameters or figures (NaN/inf)")
    else:
        judge_confirms = judge.above(config.min_reward_gain)
        users_confirm = users.units >= MIN_VERDICT_RANKINGS and users.above(0.5)
        evidence = (f"judge's reward gain {judge.describe()}, users' held-out verdict {_describe_verdict(users)}, "
                    f"the member PPO optimised: {optimised.describe()}")
        if not (judge_confirms or users_confirm):
            failures.append(f"neither the judge's reward gain nor the users' held-out verdict confirms a gain "
                            f"({evidence}; needed: the judge's lower bound above {config.min_reward_gain} or the "
                            f"users' above 0.5 on at least {MIN_VERDICT_RANKINGS} rankings)")
        if figures["kl_to_ref"] > config.kl_budget:
            failures.append(f"KL to π_ref {figures['kl_to_ref']:.3f} > budget {config.kl_budget}")
        if figures["perplexity_ratio"] > 1 + config.perplexity_margin:
            failures.append(f"perplexity {figures['perplexity_ratio']:.4f}× π_ref's > 1 + {config.perplexity_margin}")
    figures = json_safe_figures(figures | verdict)
    if failures:
        return GateDecision(False, "; ".join(failures), figures)
    by = "the judge's reward gain" if judge_confirms else "the users' held-out verdict"
    return GateDecision(True, (f"confirmed by {by} ({evidence}), KL {figures['kl_to_ref']:.3f} nats, "
                               f"perplexity ratio {figures['perplexity_ratio']:.4f}"), figures)


def _describe_verdict(users: Interval) -> str:
    if not users.units:
        return "n/a (no held-out rankings)"
    return f"{users.mean:.3f} ({users.level:.1%} CI {users.low:.3f}-{users.high:.3f}, {users.units} rankings)"
