"""The pieces of the PPO objective against values worked out by hand on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from training.policy_gate import PolicyEvaluation, PolicyGateConfig, gate_decision
from training.ppo import (AdaptiveKLController, clipped_policy_loss, clipped_value_loss, entropy_from_logits,
                          gae_advantages, kl_penalized_rewards, whiten)


def test_rewards_are_the_kl_penalty_per_token_plus_the_score_at_the_last_token():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -9.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, -3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the second response ended after 2 tokens
    rewards, kl = kl_penalized_rewards(logprobs, ref_logprobs, torch.tensor([2.0, -1.0]), mask, kl_coef=0.1)
    # kl = [[0.5, -1, 0], [1, 0, (masked)]]; r = −0.1·kl, + score at the last real token
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1, 2.0], [-0.1, -1.0, 0.0]]))


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 0.4]])
    mask = torch.ones(1, 3)
    gamma, lam = 0.9, 0.8
    advantages, returns = gae_advantages(rewards, values, mask, gamma, lam)
    d2 = 1.0 - 0.4                       # last token: V(s_3) = 0
    d1 = 0.0 + 0.9 * 0.4 - 0.2
    d0 = 0.0 + 0.9 * 0.2 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    assert torch.allclose(advantages, torch.tensor([[a0, a1, a2]]))
    assert torch.allclose(returns, torch.tensor([[a0 + 0.5, a1 + 0.2, a2 + 0.4]]))


def test_gae_ignores_values_past_the_end_of_a_response():
    rewards = torch.tensor([[0.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    a, _ = gae_advantages(rewards, torch.tensor([[0.5, 0.2, 99.0]]), mask, gamma=1.0, lam=1.0)
    assert torch.allclose(a, torch.tensor([[1.0 - 0.5, 1.0 - 0.2, 0.0]]))


def test_clipped_policy_loss_by_hand():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.75, 0.25, 0.55, 0.75]]))  # ratios 1.5, 0.5, 1.1, 1.5
    advantages = torch.tensor([[1.0, 1.0, -2.0, -1.0]])
    mask = torch.ones(1, 4)
    loss, stats = clipped_policy_loss(new, old, advantages, mask, cliprange=0.2)
    # per token max(−Â·ρ, −Â·clip(ρ, 0.8, 1.2)):
    #   Â=1, ρ=1.5: max(−1.5, −1.2) = −1.2 (clipped)    Â=1, ρ=0.5: max(−0.5, −0.8) = −0.5
    #   Â=−2, ρ=1.1: max(2.2, 2.2) = 2.2                 Â=−1, ρ=1.5: max(1.5, 1.2) = 1.5
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2 + 1.5) / 4)
    assert stats["clipfrac"].item() == pytest.approx(1 / 4)
    ratios = torch.tensor([1.5, 0.5, 1.1, 1.5])
    assert stats["approx_kl"].item() == pytest.approx(((ratios - 1) - ratios.log()).mean().item(), rel=1e-5)


def test_clipped_policy_loss_gradient_is_zero_where_clipped():
    old = torch.zeros(1, 2)
    new = torch.tensor([[math.log(1.5), math.log(1.1)]], requires_grad=True)
    loss, _ = clipped_policy_loss(new, old, torch.tensor([[1.0, 1.0]]), torch.ones(1, 2), cliprange=0.2)
    loss.backward()
    assert new.grad[0, 0].item() == 0.0  # beyond 1 + ε with a positive advantage: no push further
    assert new.grad[0, 1].item() == pytest.approx(-1.1 / 2)


def test_clipped_value_loss_by_hand():
    old_values = torch.tensor([[1.0, 1.0]])
    values = torch.tensor([[2.0, 0.9]])
    returns = torch.tensor([[3.0, 0.0]])
    loss, stats = clipped_value_loss(values, old_values, returns, torch.ones(1, 2), cliprange_value=0.2)
    # token 1: max((2−3)², (1.2−3)²) = 3.24 (clipped wins); token 2: max(0.81, 0.81) = 0.81
    assert loss.item() == pytest.approx(0.5 * (3.24 + 0.81) / 2)
    assert stats["vf_clipfrac"].item() == pytest.approx(0.5)


def test_whiten_and_entropy():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = whiten(x, mask)
    assert torch.allclose(w, torch.tensor([[-1.2247, 0.0, 1.2247, 0.0]]), atol=1e-4)
    uniform = torch.zeros(2, 8)
    assert torch.allclose(entropy_from_logits(uniform), torch.full((2,), math.log(8)))


def test_adaptive_kl_controller_raises_beta_above_target_and_lowers_it_below():
    controller = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    controller.update(current_kl=12.0, n_steps=100)  # error clipped at +0.2
    assert controller.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000))
    controller = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    controller.update(current_kl=5.4, n_steps=100)
    assert controller.value == pytest.approx(0.1 * (1 - 0.1 * 100 / 1000))


def test_the_gate_rejects_a_nan_candidate_and_passes_a_good_one():
    config = PolicyGateConfig(min_reward_gain=0.0, kl_budget=5.0, perplexity_margin=0.05)

    def evaluation(shift: float, kl: float, ppl: float) -> PolicyEvaluation:
        scores = [[0.2 + shift + 0.01 * ((7 * p + s) % 5) for s in range(4)] for p in range(10)]
        return PolicyEvaluation(scores={"policy": scores, "judge": scores}, kl_to_ref=kl, perplexity=ppl)

    current = evaluation(0.0, 0.0, 10.0)
    good = gate_decision(evaluation(0.3, 1.0, 10.2), current, 10.0, True, config)
    assert good.passed and good.figures["reward_gain"] == pytest.approx(0.3)
    nan = gate_decision(evaluation(float("nan"), 1.0, 10.2), current, 10.0, True, config)
    assert not nan.passed and "NaN" in nan.why
    assert nan.figures["mean_score"] == "nan"  # JSON-safe
    bad_weights = gate_decision(evaluation(0.3, 1.0, 10.2), current, 10.0, False, config)
    assert not bad_weights.passed
    taxed = gate_decision(evaluation(0.3, 1.0, 11.0), current, 10.0, True, config)
    assert not taxed.passed and "perplexity" in taxed.why
    drifted = gate_decision(evaluation(0.3, 6.0, 10.0), current, 10.0, True, config)
    assert not drifted.passed and "KL" in drifted.why
