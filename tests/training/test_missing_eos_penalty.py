"""Defect 5: a response cut at the response length without an EOS has ``missing_eos_penalty``
taken off its score; one that ended is scored as it is."""

from __future__ import annotations

import pytest
import torch

from support.policy import one_thread  # noqa: F401 (fixture)
from training_fixtures import tiny_policy, tiny_prompts
from training.policy_model import response_mask_until_eos
from training.ppo import PPOConfig, PPOTrainer, missing_eos_penalized

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_penalty_is_taken_off_the_truncated_responses_only():
    scores = torch.tensor([0.5, 0.5, -1.0])
    truncated = torch.tensor([True, False, True])
    assert missing_eos_penalized(scores, truncated, 1.0).tolist() == [-0.5, 0.5, -2.0]
    assert missing_eos_penalized(scores, truncated, 0.0).tolist() == scores.tolist()


def first_row_stops_after_two_tokens(policy):
    """Wrap ``policy.generate`` so that the first response ends with an EOS at its third token (a
    random tiny model almost never samples it); the others run to the length limit."""
    generate = policy.generate

    def generate_with_an_eos(prompts, response_length, *args, **kwargs):
        query_responses, attention_mask, responses, _ = generate(prompts, response_length, *args, **kwargs)
        responses = responses.clone()
        responses[0, 2] = policy.eos_id
        responses[0, 3:] = policy.pad_id
        mask = response_mask_until_eos(responses, policy.eos_id)
        prompt_width = query_responses.shape[1] - response_length
        query_responses = torch.cat([query_responses[:, :prompt_width], responses], dim=1)
        attention_mask = torch.cat([attention_mask[:, :prompt_width], mask.long()], dim=1)
        return query_responses, attention_mask, responses, mask.float()

    policy.generate = generate_with_an_eos


@pytest.mark.parametrize("penalty", [1.0, 0.0])
def test_ppo_scores_a_cut_response_below_the_same_score_finished(sharp_tiny_model_dir, penalty):
    policy = tiny_policy(sharp_tiny_model_dir)  # π = π_ref and V = 0: the last token's advantage is the score
    first_row_stops_after_two_tokens(policy)
    seen = []

    def reward(prompt_ids, response_ids):
        seen.extend(response_ids)
        return torch.full((len(response_ids),), 0.25)

    config = PPOConfig(batch_size=4, mini_batch_size=2, rollout_batch_size=4, response_length=5,
                       missing_eos_penalty=penalty)
    trainer = PPOTrainer(policy, reward, config)
    rollout = trainer.rollout(tiny_prompts(policy, 4))
    assert rollout.truncated.tolist() == [False, True, True, True]
    assert seen[0][-1] == policy.eos_id and len(seen[0]) == 3 and all(len(r) == 5 for r in seen[1:])
    assert torch.equal(rollout.scores, torch.full((4,), 0.25))  # the reward model's own scores

    advantages, _, _ = trainer.advantages_and_returns(rollout)
    last = rollout.response_mask.sum(dim=1).long() - 1
    assert advantages[torch.arange(4), last].tolist() == pytest.approx([0.25] + [0.25 - penalty] * 3, abs=1e-5)
    stats = trainer.step(tiny_prompts(policy, 4))
    assert stats.truncated_fraction == 0.75
    assert stats.mean_reward == pytest.approx(0.25 - 0.75 * penalty, abs=1e-4)
