"""The reward function PPO maximizes: a trained ``RewardModel`` scoring (prompt, response) token ids.

The reward model was trained on prompt + completion + EOS (``reward_model.scored_sequence``), so a
response the policy cut off at the length limit gets the EOS appended before scoring, exactly as
a ranked completion would have; sequences are cut from the left to the model's ``max_length``.
PPO takes ``PPOConfig.missing_eos_penalty`` off the score of such a response: scored as if
complete, an unfinished answer would otherwise be paid as a finished one.

With a ``RewardCalibration`` (``calibrate``: the version's raw scores over a reference set of
served completions, scored exactly as PPO's responses are) the scorer returns calibrated scores,
(r − mean) / std: mean 0 and standard deviation 1 on that set, whatever the version's offset.

Length-neutral scoring (``length_neutral=True``, the policy run's ``reward_length: neutral``)
also takes out the version's linear dependence on log(response tokens) fitted on that set. Users'
rankings confound length with what they prefer (an answer with no hedges is more often a short
one), and a reward model learns the confound: on one round of the demo's rankings "the shorter
answer wins" alone was right on 56% of the pairs, and PPO, for which nothing is cheaper than
ending earlier, raised its reward by shortening answers (median 256 -> 76 characters) while the
length-controlled win rate stayed at chance (0.48). Without the length term PPO can only gain
reward by changing what answers say. ``learned`` keeps it, for users whose preference *is* about
length.

The scorer feeds the reward model the policy's token ids, so both must use one vocabulary (and
one EOS): given the policy's tokenizer, it refuses a reward model whose backbone tokenizes
differently (``check_same_vocabulary``) rather than score what would be gibberish to it.
"""

from __future__ import annotations

import torch

from training.policy_model import pad_sequences
from training.reward_model import RewardCalibration, RewardModel, scored_sequence

__all__ = ["RewardCalibration", "RewardModelScorer", "calibrate", "check_same_vocabulary"]


class RewardModelScorer:
    """``scorer(prompt_ids, response_ids) -> scores [N]`` (a ``ppo.RewardFunction``): calibrated
    when a ``calibration`` is given, raw otherwise."""

    def __init__(self, model: RewardModel, eos_id: int, pad_id: int = 0, batch_size: int = 32,
                 calibration: RewardCalibration | None = None, policy_tokenizer=None, reward_tokenizer=None,
                 length_neutral: bool = False) -> None:
        """``policy_tokenizer``: the policy's, checked against the reward model's (``reward_tokenizer``,
        by default loaded from its backbone folder); a difference raises ValueError.
        ``length_neutral``: calibrated scores without the version's length dependence (needs a
        ``calibration`` with a length fit)."""
        if length_neutral and (calibration is None or not calibration.has_length_fit):
            raise ValueError("length-neutral scoring needs a calibration with a length fit (a reward-model "
                             "version calibrated with its completions' lengths)")
        if policy_tokenizer is not None:
            check_same_vocabulary(model, policy_tokenizer, eos_id, reward_tokenizer)
        self.model = model.eval()
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.calibration = calibration
        self.length_neutral = length_neutral

    def __call__(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> torch.Tensor:
        raw, lengths = self.raw_scores_and_lengths(prompt_ids, response_ids)
        if self.calibration is None:
            return raw
        if self.length_neutral:
            return self.calibration.normalize_length_neutral(raw, lengths)
        return self.calibration.normalize(raw)

    def raw_scores(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> torch.Tensor:
        """r_φ(x, y) [N] of prompt + response (+ EOS when it has none), uncalibrated."""
        return self.raw_scores_and_lengths(prompt_ids, response_ids)[0]

    @torch.no_grad()
    def raw_scores_and_lengths(self, prompt_ids: list[list[int]],
                               response_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw scores [N] and the scored completions' lengths in tokens (with the EOS) [N]."""
        sequences, completion_lengths = [], []
        for prompt, response in zip(prompt_ids, response_ids):
            ids, completion_length = scored_sequence(prompt, response, self.eos_id, self.model.config.max_length)
            sequences.append(ids)
            completion_lengths.append(completion_length)
        scores = [self.model(*pad_sequences(sequences[start:start + self.batch_size], self.pad_id),
                             torch.tensor(completion_lengths[start:start + self.batch_size], dtype=torch.long))
                  for start in range(0, len(sequences), self.batch_size)]
        return torch.cat(scores), torch.tensor(completion_lengths, dtype=torch.long)


def calibrate(model: RewardModel, prompt_ids: list[list[int]], response_ids: list[list[int]], eos_id: int,
              pad_id: int = 0, batch_size: int = 32, policy_tokenizer=None) -> RewardCalibration:
    """The calibration of ``model`` over a reference set of (prompt, completion) token ids (served
    completions: what the policy samples), scored exactly as ``RewardModelScorer`` scores PPO's,
    with its length dependence fitted on the same set."""
    scorer = RewardModelScorer(model, eos_id=eos_id, pad_id=pad_id, batch_size=batch_size,
                               policy_tokenizer=policy_tokenizer)
    return RewardCalibration.from_scores(*scorer.raw_scores_and_lengths(prompt_ids, response_ids))


def check_same_vocabulary(model: RewardModel, policy_tokenizer, eos_id: int, reward_tokenizer=None) -> None:
    """Raise ValueError unless the reward model's tokenizer maps every token to the id the policy's
    does and ends a completion with the policy's EOS (``eos_id``)."""
    if reward_tokenizer is None:
        from transformers import AutoTokenizer

        reward_tokenizer = AutoTokenizer.from_pretrained(model.config.backbone)
    reward_name = f"reward model backbone {model.config.backbone!r}"
    policy_name = f"policy tokenizer {getattr(policy_tokenizer, 'name_or_path', '?')!r}"
    reward_vocabulary, policy_vocabulary = reward_tokenizer.get_vocab(), policy_tokenizer.get_vocab()
    if reward_vocabulary != policy_vocabulary:
        differ = sum(reward_vocabulary.get(token) != index for token, index in policy_vocabulary.items())
        raise ValueError(
            f"the {reward_name} has another vocabulary than the {policy_name} ({len(reward_vocabulary)} vs "
            f"{len(policy_vocabulary)} tokens, {differ} of the policy's mapped differently): the scorer feeds the "
            "reward model the policy's token ids; train it on a backbone with the policy's tokenizer")
    if reward_tokenizer.eos_token_id != eos_id:
        raise ValueError(f"the {reward_name} ends completions with token {reward_tokenizer.eos_token_id}, the "
                         f"{policy_name} with {eos_id}: the reward model would score completions it never saw end")
