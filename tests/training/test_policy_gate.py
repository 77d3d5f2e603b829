"""The policy gate decides on evidence from the member PPO did not optimise."""

from __future__ import annotations

import random

from training.policy_gate import PolicyEvaluation, PolicyGateConfig, gate_decision


def evaluation(policy_scores, judge_scores, kl=1.0, perplexity=10.0) -> PolicyEvaluation:
    return PolicyEvaluation(scores={"policy": policy_scores, "judge": judge_scores}, kl_to_ref=kl,
                            perplexity=perplexity)


def scores(rng, prompts, samples, shift=0.0, spread=1.0):
    base = [rng.gauss(0, 2) for _ in range(prompts)]
    return [[b + shift + rng.gauss(0, spread) for _ in range(samples)] for b in base], base


def paired(rng, base, samples, shift=0.0, spread=1.0):
    return [[b + shift + rng.gauss(0, spread) for _ in range(samples)] for b in base]


def test_a_gain_the_judge_confirms_is_promoted():
    rng = random.Random(0)
    current, base = scores(rng, 40, 4)
    candidate = paired(rng, base, 4, shift=0.6)
    decision = gate_decision(evaluation(candidate, candidate), evaluation(current, current), 10.0, True,
                             PolicyGateConfig())
    assert decision.passed, decision.why
    assert decision.figures["reward_gain_low"] > 0 and decision.figures["heldout_prompts"] == 40.0


def test_a_gain_only_on_the_optimised_member_is_over_optimisation_and_rejected():
    rng = random.Random(1)
    current_policy, base = scores(rng, 40, 4)
    current_judge, judge_base = scores(rng, 40, 4)
    candidate_policy = paired(rng, base, 4, shift=2.0)  # PPO pushed the member it optimised a lot
    candidate_judge = paired(rng, judge_base, 4, shift=0.0)  # the independent judge sees nothing
    decision = gate_decision(evaluation(candidate_policy, candidate_judge), evaluation(current_policy, current_judge),
                             10.0, True, PolicyGateConfig())
    assert not decision.passed
    assert "judge's reward gain" in decision.why and decision.figures["policy_member_gain"] > 1.5


def test_a_gain_inside_the_noise_is_not_enough_and_the_threshold_is_on_the_lower_bound():
    rng = random.Random(2)
    current, base = scores(rng, 8, 4)
    candidate = paired(rng, base, 4, shift=0.3, spread=2.0)
    decision = gate_decision(evaluation(candidate, candidate), evaluation(current, current), 10.0, True,
                             PolicyGateConfig())
    assert not decision.passed  # a positive mean, but 8 noisy prompts cannot show it
    assert decision.figures["reward_gain"] > 0 > decision.figures["reward_gain_low"]
    strong = paired(random.Random(3), base, 4, shift=3.0, spread=0.1)
    assert not gate_decision(evaluation(strong, strong), evaluation(current, current), 10.0, True,
                             PolicyGateConfig(min_reward_gain=5.0)).passed


def test_the_other_checks_still_apply():
    rng = random.Random(4)
    current, base = scores(rng, 40, 4)
    candidate = paired(rng, base, 4, shift=1.0)
    too_far = gate_decision(evaluation(candidate, candidate, kl=50.0), evaluation(current, current), 10.0, True,
                            PolicyGateConfig(kl_budget=10.0))
    assert not too_far.passed and "KL" in too_far.why
    nan = gate_decision(evaluation(candidate, candidate), evaluation(current, current), 10.0, False, PolicyGateConfig())
    assert not nan.passed and "non-finite" in nan.why
