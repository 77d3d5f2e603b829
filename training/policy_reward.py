"""The reward function PPO maximizes: a trained ``RewardModel`` scoring (prompt, response) token ids.

The reward model was trained on prompt + completion + EOS (``RankingCollator.encode``), so a
response the policy cut off at the length limit gets the EOS appended before scoring, exactly as
a ranked completion would have; sequences are cut from the left to the model's ``max_length``.
PPO takes ``PPOConfig.missing_eos_penalty`` off the score of such a response: scored as if
complete, an unfinished answer would otherwise be paid as a finished one.
"""

from __future__ import annotations

import torch

from training.policy_model import pad_sequences
from training.reward_model import RewardModel


class RewardModelScorer:
    """``scorer(prompt_ids, response_ids) -> scores [N]`` (a ``ppo.RewardFunction``)."""

    def __init__(self, model: RewardModel, eos_id: int, pad_id: int = 0, batch_size: int = 32) -> None:
        self.model = model.eval()
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> torch.Tensor:
        sequences = []
        for prompt, response in zip(prompt_ids, response_ids):
            ids = list(prompt) + list(response)
            if not response or response[-1] != self.eos_id:
                ids.append(self.eos_id)
            sequences.append(ids[-self.model.config.max_length:])
        scores = [self.model(*pad_sequences(sequences[start:start + self.batch_size], self.pad_id))
                  for start in range(0, len(sequences), self.batch_size)]
        return torch.cat(scores)
