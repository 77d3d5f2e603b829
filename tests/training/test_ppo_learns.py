"""PPO on a tiny model with a toy reward: the reward goes up, the KL to π_ref stays bounded, and a
policy with a NaN weight is rejected by the gate."""

from __future__ import annotations

import pytest
import torch

from flywheel.contracts.prompts import render_prompt
from support.policy import one_thread  # noqa: F401 (fixture)
from training.policy_gate import PolicyGateConfig, evaluate_policy, gate_decision, perplexity
from training.policy_model import PolicyModelConfig, PolicyWithValueHead, Prompt
from training.ppo import PPOConfig, PPOTrainer


pytestmark = pytest.mark.usefixtures("one_thread")


def toy_reward(policy: PolicyWithValueHead):
    """10 × the fraction of response tokens in a fixed half of the vocabulary (those whose embedding
    points along a random direction): a reward the policy can reach by moving its hidden state."""
    embeddings = policy.lm_head.weight.detach().float()
    direction = torch.randn(embeddings.shape[1], generator=torch.Generator().manual_seed(0))
    rewarded = torch.zeros(embeddings.shape[0], dtype=torch.bool)
    rewarded[torch.topk(embeddings @ direction, embeddings.shape[0] // 2).indices] = True

    def reward(prompt_ids, response_ids):
        return torch.tensor([10.0 * float(rewarded[r].float().mean()) if r else 0.0 for r in response_ids])
    return reward


def test_ppo_raises_the_reward_while_the_kl_to_the_reference_stays_bounded(sharp_tiny_model_dir):
    torch.manual_seed(0)
    policy = PolicyWithValueHead.from_pretrained(
        PolicyModelConfig(str(sharp_tiny_model_dir), lora_rank=8, autocast_dtype="float32"))
    reward = toy_reward(policy)
    prompts = [Prompt(*render_prompt(policy.tokenizer, f"Tell me about number {i}.")) for i in range(32)]
    evaluation = PolicyGateConfig(response_length=12, batch_size=64, samples_per_prompt=4)
    before = evaluate_policy(policy, {"judge": reward}, prompts, [], evaluation)
    assert before.kl_to_ref == 0.0  # fresh adapters: π = π_ref

    config = PPOConfig(batch_size=32, mini_batch_size=8, rollout_batch_size=32, response_length=12,
                       learning_rate=5e-3, kl_coef=0.05, ppo_epochs=4, seed=0)
    result = PPOTrainer(policy, reward, config).train(prompts, iterations=8)
    after = evaluate_policy(policy, {"judge": reward}, prompts, [], evaluation)

    assert after.mean_score("judge") > before.mean_score("judge") + 0.8, (before.kl_to_ref, after.kl_to_ref)
    assert 0.0 < after.kl_to_ref < 15.0
    for stats in result.iterations:
        assert all(torch.isfinite(torch.tensor(v)) for v in (stats.policy_loss, stats.value_loss, stats.entropy))
        assert 0.0 <= stats.clipfrac <= 1.0
    assert result.iterations[0].kl_to_ref == pytest.approx(0.0, abs=1e-6)
    assert result.iterations[-1].kl_to_ref > 0


def test_the_ptx_term_keeps_the_language_model_loss_down(sharp_tiny_model_dir):
    torch.manual_seed(0)
    policy = PolicyWithValueHead.from_pretrained(
        PolicyModelConfig(str(sharp_tiny_model_dir), lora_rank=8, autocast_dtype="float32"))
    texts = ["the cat sat on the mat and looked at the door"] * 4
    batches = policy.text_batches(texts, 4, 32)
    before = perplexity(policy, batches)
    prompts = [Prompt(*render_prompt(policy.tokenizer, f"Say {i}.")) for i in range(8)]
    config = PPOConfig(batch_size=8, mini_batch_size=4, rollout_batch_size=8, response_length=4, learning_rate=5e-3,
                       ptx_coef=1.0, ptx_batch_size=4, ptx_max_length=32, seed=0)
    result = PPOTrainer(policy, lambda p, r: torch.zeros(len(r)), config, ptx_texts=texts).train(prompts, 3)
    assert result.last.ptx_loss is not None
    assert perplexity(policy, batches) < before  # with a zero reward, γ·ptx is what the policy learns
    assert perplexity(policy, batches, reference=True) == pytest.approx(before, rel=1e-4)  # π_ref unchanged


def test_a_policy_with_a_nan_weight_is_rejected_by_the_gate(sharp_tiny_model_dir):
    policy = PolicyWithValueHead.from_pretrained(
        PolicyModelConfig(str(sharp_tiny_model_dir), lora_rank=4, autocast_dtype="float32"))
    reward = toy_reward(policy)
    prompts = [Prompt(*render_prompt(policy.tokenizer, f"Tell me about number {i}.")) for i in range(4)]
    texts = policy.text_batches(["A short held-out text about the weather."], 4, 32)
    config = PolicyGateConfig(response_length=4, kl_budget=100.0, perplexity_margin=1.0, min_reward_gain=-100.0)
    current = evaluate_policy(policy, {"judge": reward}, prompts, texts, config)
    reference_perplexity = perplexity(policy, texts, reference=True)
    with torch.no_grad():
        next(p for n, p in policy.named_parameters() if "lora_B" in n).fill_(float("nan"))
    assert not policy.all_finite()
    candidate = evaluate_policy(policy, {"judge": reward}, prompts, texts, config)
    decision = gate_decision(candidate, current, reference_perplexity, policy.all_finite(), config)
    assert not decision.passed
    assert "NaN" in decision.why


def test_the_kl_stop_keeps_the_last_iterate_whose_rollout_was_within_it(sharp_tiny_model_dir):
    """The run that would leave the gate's KL budget ends at the first rollout past kl_stop and hands
    back the policy that rolled out the iteration before, not the one past the limit."""
    torch.manual_seed(0)
    policy = PolicyWithValueHead.from_pretrained(
        PolicyModelConfig(str(sharp_tiny_model_dir), lora_rank=8, autocast_dtype="float32"))
    reward = toy_reward(policy)
    prompts = [Prompt(*render_prompt(policy.tokenizer, f"Tell me about number {i}.")) for i in range(32)]
    trained = lambda: {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}  # noqa: E731
    after_update = [trained()]  # [i]: the parameters after i updates

    config = PPOConfig(batch_size=32, mini_batch_size=8, rollout_batch_size=32, response_length=12,
                       learning_rate=5e-3, kl_coef=0.0, ppo_epochs=4, seed=0, kl_stop=0.5)
    result = PPOTrainer(policy, reward, config, progress=lambda *_: after_update.append(trained())).train(
        prompts, iterations=12)

    assert result.stopped and "past kl_stop 0.5" in result.stopped, result.stopped
    kept = len(result.iterations) - 1  # the last recorded rollout was within the stop; its update is undone
    assert 1 <= len(result.iterations) < 12
    assert all(stats.kl_to_ref <= 0.5 for stats in result.iterations)
    now = trained()
    assert all(torch.equal(now[name], after_update[kept][name]) for name in now)
    assert not all(torch.equal(now[name], after_update[-1][name]) for name in now)
