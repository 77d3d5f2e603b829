"""Defect 3: responses sampled at τ have every log-prob (π_θold, π_ref, π_θ, the gate's KL) taken
from softmax(z/τ), the distribution they were sampled from."""

from __future__ import annotations

import math

import pytest
import torch

from support.policy import one_thread  # noqa: F401 (fixture)
from training_fixtures import tiny_policy, tiny_prompts
from training.policy_gate import PolicyGateConfig, evaluate_policy
from training.ppo import PPOConfig, PPOTrainer, entropy_from_logits, token_logprobs

TAU = 0.5

pytestmark = pytest.mark.usefixtures("one_thread")


def zero_reward(prompt_ids, response_ids):
    return torch.zeros(len(response_ids))


def logprobs_at(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log_softmax(logits.double() / temperature, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def test_token_logprobs_and_entropy_are_those_of_the_tempered_distribution():
    logits = torch.tensor([[[2.0, 0.0, -1.0, 0.5]]])
    tokens = torch.tensor([[0]])
    tempered = torch.softmax(logits / TAU, dim=-1)
    assert token_logprobs(logits, tokens, TAU).item() == pytest.approx(math.log(tempered[0, 0, 0].item()), rel=1e-6)
    expected_entropy = -(tempered * tempered.log()).sum().item()
    assert entropy_from_logits(logits, TAU).item() == pytest.approx(expected_entropy, rel=1e-5)


def test_the_rollout_keeps_the_log_probs_of_the_distribution_it_sampled_from(sharp_tiny_model_dir):
    policy = tiny_policy(sharp_tiny_model_dir, perturb=True)  # π ≠ π_ref, so both log-probs are checked
    prompts = tiny_prompts(policy, 4)
    config = PPOConfig(batch_size=4, mini_batch_size=2, rollout_batch_size=4, response_length=5, temperature=TAU)
    rollout = PPOTrainer(policy, zero_reward, config).rollout(prompts)
    length = rollout.responses.shape[1]
    with torch.no_grad():
        logits, _ = policy(rollout.query_responses, rollout.attention_mask, length)
        ref_logits = policy.reference_logits(rollout.query_responses, rollout.attention_mask, length)
    mask = rollout.response_mask.bool()
    for kept, source in ((rollout.logprobs, logits), (rollout.ref_logprobs, ref_logits)):
        expected = logprobs_at(source, rollout.responses, TAU)
        assert torch.allclose(kept.double()[mask], expected[mask], atol=1e-4)
        assert not torch.allclose(kept.double()[mask], logprobs_at(source, rollout.responses, 1.0)[mask], atol=1e-2)


def test_a_non_positive_temperature_is_refused(sharp_tiny_model_dir):
    policy = tiny_policy(sharp_tiny_model_dir)
    with pytest.raises(ValueError, match="temperature"):
        PPOTrainer(policy, zero_reward, PPOConfig(batch_size=2, mini_batch_size=2, temperature=0.0))


def test_the_gate_samples_and_measures_the_kl_at_the_rollout_temperature(sharp_tiny_model_dir):
    policy = tiny_policy(sharp_tiny_model_dir, perturb=True)
    prompts = tiny_prompts(policy, 4)
    config = PolicyGateConfig(response_length=5, batch_size=4, temperature=TAU, seed=7, samples_per_prompt=1)
    evaluation = evaluate_policy(policy, {"judge": zero_reward}, prompts, [], config)

    query_responses, attention_mask, responses, mask = policy.generate(
        prompts, 5, TAU, generator=torch.Generator().manual_seed(7))  # the gate's draws
    with torch.no_grad():
        logits, _ = policy(query_responses, attention_mask, responses.shape[1])
        ref_logits = policy.reference_logits(query_responses, attention_mask, responses.shape[1])
    kl = ((logprobs_at(logits, responses, TAU) - logprobs_at(ref_logits, responses, TAU)) * mask).sum(dim=1)
    at_one = ((logprobs_at(logits, responses, 1.0) - logprobs_at(ref_logits, responses, 1.0)) * mask).sum(dim=1)
    assert evaluation.kl_to_ref == pytest.approx(float(kl.mean()), abs=1e-4)
    assert abs(float(at_one.mean()) - float(kl.mean())) > 1e-2  # the test can tell the two apart
