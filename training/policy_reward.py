"""The reward function PPO maximizes: a trained ``RewardModel`` scoring (prompt, response) token ids.

The reward model was trained on prompt + completion + EOS (``RankingCollator.encode``), so a
response the policy cut off at the length limit gets the EOS appended before scoring, exactly as
a ranked completion would have; sequences are cut from the left to the model's ``max_length``.
PPO takes ``PPOConfig.missing_eos_penalty`` off the score of such a response: scored as if
complete, an unfinished answer would otherwise be paid as a finished one.

With a ``RewardCalibration`` (``calibrate``: the version's raw scores over a reference set of
served completions, scored exactly as PPO's responses are) the scorer returns calibrated scores,
(r − mean) / std: mean 0 and standard deviation 1 on that set, whatever the version's offset.
"""

from __future__ import annotations

import torch

from training.policy_model import pad_sequences
from training.reward_model import RewardCalibration, RewardModel

__all__ = ["RewardCalibration", "RewardModelScorer", "calibrate"]


class RewardModelScorer:
    """``scorer(prompt_ids, response_ids) -> scores [N]`` (a ``ppo.RewardFunction``): calibrated
    when a ``calibration`` is given, raw otherwise."""

    def __init__(self, model: RewardModel, eos_id: int, pad_id: int = 0, batch_size: int = 32,
                 calibration: RewardCalibration | None = None) -> None:
        self.model = model.eval()
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.calibration = calibration

    def __call__(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> torch.Tensor:
        raw = self.raw_scores(prompt_ids, response_ids)
        return raw if self.calibration is None else self.calibration.normalize(raw)

    @torch.no_grad()
    def raw_scores(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> torch.Tensor:
        """r_φ(x, y) [N] of prompt + response (+ EOS when it has none), uncalibrated."""
        sequences = []
        for prompt, response in zip(prompt_ids, response_ids):
            ids = list(prompt) + list(response)
            if not response or response[-1] != self.eos_id:
                ids.append(self.eos_id)
            sequences.append(ids[-self.model.config.max_length:])
        scores = [self.model(*pad_sequences(sequences[start:start + self.batch_size], self.pad_id))
                  for start in range(0, len(sequences), self.batch_size)]
        return torch.cat(scores)


def calibrate(model: RewardModel, prompt_ids: list[list[int]], response_ids: list[list[int]], eos_id: int,
              pad_id: int = 0, batch_size: int = 32) -> RewardCalibration:
    """The calibration of ``model`` over a reference set of (prompt, completion) token ids (served
    completions: what the policy samples), scored exactly as ``RewardModelScorer`` scores PPO's."""
    scorer = RewardModelScorer(model, eos_id=eos_id, pad_id=pad_id, batch_size=batch_size)
    return RewardCalibration.from_scores(scorer.raw_scores(prompt_ids, response_ids))
