"""The group-relative option: ``advantage_estimator="rloo"`` rolls each prompt out k times, gives a
sample its score minus the mean of the prompt's other k − 1 scores (plus the KL penalties to come),
and trains no critic."""

from __future__ import annotations

import pytest
import torch

from support.policy import one_thread  # noqa: F401 (fixture)
from training_fixtures import tiny_policy, tiny_prompts
from training.ppo import PPOConfig, PPOTrainer, leave_one_out_scores, rewards_to_go

K = 4

pytestmark = pytest.mark.usefixtures("one_thread")


def test_leave_one_out_scores_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert leave_one_out_scores(scores, 2).tolist() == [-1.0, 1.0, -3.0, 3.0]
    assert leave_one_out_scores(scores, 4).tolist() == pytest.approx([1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3])
    assert leave_one_out_scores(scores, 4).sum().item() == pytest.approx(0.0, abs=1e-6)


def test_rewards_to_go_by_hand():
    rewards = torch.tensor([[0.1, -0.2, 1.0], [0.5, 2.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    assert torch.allclose(rewards_to_go(rewards, mask), torch.tensor([[0.9, 0.8, 1.0], [2.5, 2.0, 0.0]]))


def rloo_config(**overrides) -> PPOConfig:
    return PPOConfig(**{"batch_size": 2 * K, "mini_batch_size": 4, "rollout_batch_size": 2 * K,
                        "response_length": 4, "ppo_epochs": 1, "learning_rate": 1e-2, "seed": 0,
                        "advantage_estimator": "rloo", "samples_per_prompt": K} | overrides)


def response_score(prompt_ids, response_ids):
    """A score that differs between the samples of one prompt."""
    return torch.tensor([float(sum(r) % 7) for r in response_ids])


def test_rloo_advantages_sum_to_zero_over_each_prompts_samples_and_no_critic_is_trained(sharp_tiny_model_dir):
    policy = tiny_policy(sharp_tiny_model_dir)  # π = π_ref: no KL penalty yet
    prompts = tiny_prompts(policy, 2)
    seen_prompts = []

    def reward(prompt_ids, response_ids):
        seen_prompts.extend(tuple(p) for p in prompt_ids)
        return response_score(prompt_ids, response_ids)

    trainer = PPOTrainer(policy, reward, rloo_config())
    rollout = trainer.rollout([p for p in prompts for _ in range(K)])
    assert len(set(seen_prompts[:K])) == 1 and len(set(seen_prompts[K:])) == 1 and seen_prompts[0] != seen_prompts[K]
    advantages, _, _ = trainer.advantages_and_returns(rollout)
    mask = rollout.response_mask
    # a sample's advantage is one number over its tokens: its leave-one-out score
    scores = rollout.scores - rollout.truncated.float()  # the missing-EOS penalty (1.0) first
    expected = leave_one_out_scores(scores, K)
    assert torch.allclose(advantages, expected[:, None] * mask, atol=1e-5)
    assert advantages[:, 0].view(2, K).sum(dim=1).abs().max() < 1e-5
    assert advantages[:, 0].abs().max() > 0.1  # the samples' scores differ: there is something to learn

    head = {name: p.detach().clone() for name, p in policy.value_head.named_parameters()}
    adapters = {name: p.detach().clone() for name, p in policy.named_parameters() if "lora_" in name}
    stats = trainer.step(prompts)  # 2 prompts, each rolled out K times
    assert stats.episodes == 2 * K and stats.value_loss == 0.0 and stats.policy_loss != 0.0
    assert all(torch.equal(p, head[name]) for name, p in policy.value_head.named_parameters())
    assert all(p.grad is None for p in policy.value_head.parameters())
    assert any(not torch.equal(p, adapters[name]) for name, p in policy.named_parameters() if "lora_" in name)


def test_rloo_keeps_the_per_token_kl_penalty(sharp_tiny_model_dir):
    policy = tiny_policy(sharp_tiny_model_dir, perturb=True)  # π ≠ π_ref
    trainer = PPOTrainer(policy, response_score, rloo_config(kl_coef=0.5))
    rollout = trainer.rollout([p for p in tiny_prompts(policy, 2) for _ in range(K)])
    advantages, _, kl = trainer.advantages_and_returns(rollout)
    assert kl.abs().max() > 1e-3
    scores = leave_one_out_scores(rollout.scores - rollout.truncated.float(), K)
    kl_to_go = rewards_to_go(kl, rollout.response_mask)
    assert torch.allclose(advantages, (scores[:, None] - 0.5 * kl_to_go) * rollout.response_mask, atol=1e-5)


def test_train_draws_batch_size_over_k_prompts_an_iteration(sharp_tiny_model_dir):
    policy = tiny_policy(sharp_tiny_model_dir)
    result = PPOTrainer(policy, response_score, rloo_config()).train(tiny_prompts(policy, 5), iterations=1)
    assert result.last.episodes == 2 * K


@pytest.mark.parametrize("overrides, message", [
    ({"samples_per_prompt": 1}, "samples_per_prompt >= 2"),
    ({"samples_per_prompt": 3}, "multiple of samples_per_prompt"),
    ({"advantage_estimator": "grpo"}, "advantage_estimator"),
])
def test_inconsistent_rloo_settings_are_refused(sharp_tiny_model_dir, overrides, message):
    with pytest.raises(ValueError, match=message):
        PPOTrainer(tiny_policy(sharp_tiny_model_dir), response_score, rloo_config(**overrides))


def test_gae_stays_the_default():
    assert PPOConfig().advantage_estimator == "gae" and PPOConfig().samples_per_prompt == 1
