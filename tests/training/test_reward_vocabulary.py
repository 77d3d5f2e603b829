"""Defect 7: the scorer feeds the reward model the policy's token ids, so it refuses a reward model
whose backbone has another vocabulary (or another EOS), naming both."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from support.policy import one_thread  # noqa: F401 (fixture)
from training.policy_reward import RewardModelScorer, calibrate
from training.reward_model import RewardModel, RewardModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reward_model(tiny_model_dir) -> RewardModel:
    torch.manual_seed(0)
    return RewardModel.from_backbone(RewardModelConfig(str(tiny_model_dir), trainable_layers=0, max_length=64,
                                                       autocast_dtype="float32"))


def test_a_reward_model_with_the_policys_tokenizer_is_accepted(reward_model, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    scorer = RewardModelScorer(reward_model, eos_id=tokenizer.eos_token_id, policy_tokenizer=tokenizer)
    assert scorer([[10, 11, 12]], [[13, 14]]).shape == (1,)


def test_another_vocabulary_is_refused_naming_both(reward_model, tiny_model_dir, tmp_path):
    other = AutoTokenizer.from_pretrained(tiny_model_dir)
    other.add_tokens(["<a-token-the-reward-model-never-saw>"])
    other.save_pretrained(tmp_path / "other-tokenizer")
    other = AutoTokenizer.from_pretrained(tmp_path / "other-tokenizer")
    with pytest.raises(ValueError, match="another vocabulary") as refused:
        RewardModelScorer(reward_model, eos_id=other.eos_token_id, policy_tokenizer=other)
    assert str(tiny_model_dir) in str(refused.value) and "other-tokenizer" in str(refused.value)
    with pytest.raises(ValueError, match="another vocabulary"):
        calibrate(reward_model, [[10, 11]], [[12], [13]], eos_id=other.eos_token_id, policy_tokenizer=other)


def test_another_eos_is_refused(reward_model, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="ends completions"):
        RewardModelScorer(reward_model, eos_id=tokenizer.eos_token_id + 1, policy_tokenizer=tokenizer)
