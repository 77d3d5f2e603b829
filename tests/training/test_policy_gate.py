"""The policy gate decides on evidence from the member PPO did not optimise."""

from __future__ import annotations

import random

import pytest

from training.policy_gate import PolicyEvaluation, PolicyGateConfig, gate_decision, users_verdict


def evaluation(policy_scores, judge_scores, kl=1.0, perplexity=10.0, ranked=()) -> PolicyEvaluation:
    return PolicyEvaluation(scores={"policy": policy_scores, "judge": judge_scores}, kl_to_ref=kl,
                            perplexity=perplexity, ranked_logprobs=[list(r) for r in ranked])


def ranked_logprobs(rng, rankings, answers=4, towards_the_users=0.0, base=None):
    """log π of each ranking's answers (best first): ``base`` plus a shift that grows with the users'
    preference (``towards_the_users`` per place) and noise."""
    base = base or [[rng.gauss(-60, 15) for _ in range(answers)] for _ in range(rankings)]
    return [[b + towards_the_users * (answers - 1 - i) + rng.gauss(0, 1) for i, b in enumerate(row)] for row in base], base


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


def test_the_users_verdict_is_the_share_of_held_out_pairs_moved_towards_their_choice():
    current = PolicyEvaluation(ranked_logprobs=[[-5.0, -5.0, -5.0], [-9.0, -9.0], [-1.0, -2.0]])
    candidate = PolicyEvaluation(ranked_logprobs=[[-2.0, -3.0, -4.0], [-9.0, -8.0], [-1.0, -2.0]])
    verdict = users_verdict(candidate, current)
    # ranking 1: all 3 pairs right; ranking 2: its one pair wrong; ranking 3: no change, a tie (half)
    assert verdict.mean == pytest.approx((3 + 0 + 0.5) / 5) and verdict.units == 3
    assert users_verdict(PolicyEvaluation(), PolicyEvaluation()).units == 0


def test_the_users_verdict_confirms_a_gain_the_judge_cannot_see():
    rng = random.Random(5)
    current, base = scores(rng, 40, 4)
    flat = paired(rng, base, 4, shift=0.0)
    current_ranked, ranked_base = ranked_logprobs(rng, 100)
    moved, _ = ranked_logprobs(rng, 100, towards_the_users=0.5, base=ranked_base)
    decision = gate_decision(evaluation(flat, flat, ranked=moved), evaluation(current, current, ranked=current_ranked),
                             10.0, True, PolicyGateConfig())
    assert decision.passed and "users' held-out verdict" in decision.why, decision.why
    assert decision.figures["users_verdict_low"] > 0.5 > decision.figures["reward_gain_low"]
    unmoved, _ = ranked_logprobs(rng, 100, base=ranked_base)
    assert not gate_decision(evaluation(flat, flat, ranked=unmoved), evaluation(current, current, ranked=current_ranked),
                             10.0, True, PolicyGateConfig()).passed


def test_without_held_out_rankings_the_judge_alone_decides():
    rng = random.Random(7)
    current, base = scores(rng, 40, 4)
    better = paired(rng, base, 4, shift=0.6)
    decision = gate_decision(evaluation(better, better), evaluation(current, current), 10.0, True, PolicyGateConfig())
    assert decision.passed and "judge's reward gain" in decision.why.split("(")[0]
    assert decision.figures["users_verdict"] == "nan" and decision.figures["users_verdict_rankings"] == 0.0


def test_null_candidates_are_promoted_at_most_5_percent_of_the_time():
    """The null control of the gate: neither the judge nor the users' rankings tell the candidate
    from the current policy (users who rank at random, a reward model at chance). Over 400 gate
    decisions, as many promotions as the design allows (2.5%: two chances of 1.25%) and no more
    than the issue's 5%."""
    rng = random.Random(8)
    promoted = 0
    for _ in range(400):
        current, base = scores(rng, 40, 4)
        candidate = paired(rng, base, 4)
        current_ranked, ranked_base = ranked_logprobs(rng, 60)
        candidate_ranked, _ = ranked_logprobs(rng, 60, base=ranked_base)
        promoted += gate_decision(evaluation(candidate, candidate, ranked=candidate_ranked),
                                  evaluation(current, current, ranked=current_ranked), 10.0, True,
                                  PolicyGateConfig()).passed
    assert promoted <= 20, f"{promoted} of 400 null candidates promoted"


def test_a_handful_of_held_out_rankings_gives_the_users_verdict_no_say():
    rng = random.Random(9)
    current, base = scores(rng, 40, 4)
    flat = paired(rng, base, 4, shift=0.0)
    current_ranked = [[-10.0, -10.0]] * 3
    right_by_chance = [[-9.0, -11.0]] * 3  # all three ordered as the users did: an interval of zero width at 1.0
    decision = gate_decision(evaluation(flat, flat, ranked=right_by_chance),
                             evaluation(current, current, ranked=current_ranked), 10.0, True, PolicyGateConfig())
    assert decision.figures["users_verdict_low"] == 1.0 and not decision.passed
