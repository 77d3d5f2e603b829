"""Defect 2: the value head starts at V ≡ 0, so the first rollout's advantages are a function of
the rewards alone (no position-dependent −V(s_t) terms, i.e. no length incentive), and the first
``critic_warmup_iterations`` train the critic alone."""

from __future__ import annotations

import pytest
import torch

from support.policy import one_thread  # noqa: F401 (fixture)
from training_fixtures import tiny_policy, tiny_prompts
from training.ppo import PPOConfig, PPOTrainer, gae_advantages, kl_penalized_rewards

pytestmark = pytest.mark.usefixtures("one_thread")


def constant_reward(value: float):
    return lambda prompt_ids, response_ids: torch.full((len(response_ids),), value)


def config(**overrides) -> PPOConfig:
    """A tiny run; no missing-EOS penalty, so that the score is the whole reward (a random tiny model
    never samples the EOS)."""
    return PPOConfig(**{"batch_size": 4, "mini_batch_size": 2, "rollout_batch_size": 4, "response_length": 6,
                        "ppo_epochs": 2, "learning_rate": 1e-2, "seed": 0, "missing_eos_penalty": 0.0} | overrides)


def test_a_fresh_critic_adds_nothing_to_the_advantages_but_the_rewards(sharp_tiny_model_dir):
    policy = tiny_policy(sharp_tiny_model_dir)  # fresh adapters: π = π_ref, so the KL penalty is 0
    prompts = tiny_prompts(policy, 4)

    trainer = PPOTrainer(policy, constant_reward(0.0), config())
    rollout = trainer.rollout(prompts)
    rewards, kl = kl_penalized_rewards(rollout.logprobs, rollout.ref_logprobs, rollout.scores,
                                       rollout.response_mask, kl_coef=0.05)
    advantages, _ = gae_advantages(rewards, rollout.values, rollout.response_mask, gamma=1.0, lam=0.95)
    assert kl.abs().max() < 1e-6
    assert advantages.abs().max() < 1e-6  # no reward, no advantage: nothing that depends on the position
    assert torch.equal(rollout.values, torch.zeros_like(rollout.values))

    trainer = PPOTrainer(policy, constant_reward(1.0), config())
    rollout = trainer.rollout(prompts)
    advantages, _, _ = trainer.advantages_and_returns(rollout)
    rewards = torch.zeros_like(rollout.values)
    lengths = rollout.response_mask.sum(dim=1).long()
    rewards[torch.arange(4), lengths - 1] = 1.0
    expected, _ = gae_advantages(rewards, torch.zeros_like(rewards), rollout.response_mask, 1.0, 0.95)
    assert torch.allclose(advantages, expected, atol=1e-5)  # the discounted reward-to-go alone


def test_the_critic_warm_up_trains_the_value_head_and_leaves_the_policy_alone(sharp_tiny_model_dir):
    policy = tiny_policy(sharp_tiny_model_dir)
    prompts = tiny_prompts(policy, 4)
    adapters = {name: p.detach().clone() for name, p in policy.named_parameters() if "lora_" in name}
    trainer = PPOTrainer(policy, constant_reward(1.0), config(critic_warmup_iterations=1))

    warmup = trainer.step(prompts)
    assert warmup.critic_warmup and warmup.policy_loss == 0.0 and warmup.value_loss > 0
    assert all(torch.equal(p, adapters[name]) for name, p in policy.named_parameters() if "lora_" in name)
    assert policy.value_head.bias.item() > 0  # moved towards the returns (≈ 1)
    assert not trainer.rollout(prompts).values.eq(0).all()

    trained = trainer.step(prompts)
    assert not trained.critic_warmup and trained.policy_loss != 0.0
    assert any(not torch.equal(p, adapters[name]) for name, p in policy.named_parameters() if "lora_" in name)
