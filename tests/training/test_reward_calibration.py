"""Defect 1 (mechanics): a reward-model version is calibrated over a reference set of (prompt,
completion) token ids, and the scorer returns (raw − mean) / std: mean 0 and standard deviation 1
there, whatever offset the version's training left; length-neutral scores also carry no linear
dependence on log(length) there."""

from __future__ import annotations

import json
import math

import pytest
import torch

from support.policy import one_thread  # noqa: F401 (fixture)
from training.policy_reward import RewardCalibration, RewardModelScorer, calibrate
from training.reward_model import RewardModel, RewardModelConfig

EOS = 2

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_reward_model(model_dir) -> RewardModel:
    torch.manual_seed(0)
    return RewardModel.from_backbone(RewardModelConfig(str(model_dir), trainable_layers=0, max_length=64,
                                                       autocast_dtype="float32"))


def reference_set(count: int, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(10, 1000, (int(torch.randint(3, 9, (1,), generator=generator)),),
                             generator=generator).tolist() for _ in range(count)]
    responses = [torch.randint(10, 1000, (int(torch.randint(1, 7, (1,), generator=generator)),),
                               generator=generator).tolist() for _ in range(count)]
    responses[0] = responses[0] + [EOS]  # one that ended: not given a second EOS
    return prompts, responses


def test_calibrated_scores_have_mean_zero_and_std_one_on_the_reference_set(tiny_model_dir):
    model = tiny_reward_model(tiny_model_dir)
    prompts, responses = reference_set(16)
    calibration = calibrate(model, prompts, responses, eos_id=EOS)
    assert calibration.count == 16

    raw = RewardModelScorer(model, eos_id=EOS)(prompts, responses)
    scores = RewardModelScorer(model, eos_id=EOS, calibration=calibration)(prompts, responses)
    assert float(raw.mean()) == pytest.approx(calibration.mean, abs=1e-5)
    assert float(raw.std()) == pytest.approx(calibration.std, rel=1e-4)
    assert float(scores.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(scores.std()) == pytest.approx(1.0, abs=1e-4)
    assert torch.allclose(scores, (raw - calibration.mean) / calibration.std, atol=1e-5)


def test_a_versions_offset_and_scale_do_not_reach_the_calibrated_reward(tiny_model_dir):
    model = tiny_reward_model(tiny_model_dir)
    prompts, responses = reference_set(16)
    others = reference_set(6, seed=1)
    before = RewardModelScorer(model, eos_id=EOS, calibration=calibrate(model, prompts, responses, EOS))(*others)
    with torch.no_grad():  # what another version's initialization and training may leave
        model.reward_head.weight.mul_(3.0)
        model.reward_head.bias.add_(2.0)
    after = RewardModelScorer(model, eos_id=EOS, calibration=calibrate(model, prompts, responses, EOS))(*others)
    assert torch.allclose(before, after, atol=1e-4)


def test_a_calibration_travels_through_a_json_manifest_and_a_bad_one_is_refused():
    calibration = RewardCalibration.from_scores(torch.tensor([1.0, 2.0, 4.0]))
    assert (calibration.mean, calibration.std, calibration.count) == pytest.approx((7 / 3, math.sqrt(7 / 3), 3))
    assert RewardCalibration.from_dict(json.loads(json.dumps(calibration.to_dict()))) == calibration
    for bad in ({"mean": 0.0, "std": 0.0, "count": 10}, {"mean": float("nan"), "std": 1.0, "count": 10},
                {"mean": 0.0, "std": 1.0, "count": 1}):
        with pytest.raises(ValueError):
            RewardCalibration.from_dict(bad)
    with pytest.raises(ValueError, match="same score"):
        RewardCalibration.from_scores(torch.full((5,), 0.3))
    with pytest.raises(ValueError, match="at least 2"):
        RewardCalibration.from_scores(torch.tensor([0.3]))


def log_lengths(responses: list[list[int]]) -> torch.Tensor:
    """log(tokens scored) of each response: its tokens plus the EOS the scorer appends when missing."""
    return torch.tensor([len(r) + (not r or r[-1] != EOS) for r in responses], dtype=torch.float).log()


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


def test_length_neutral_scores_carry_no_length_dependence_on_the_reference_set(tiny_model_dir):
    """What PPO is paid under reward_length=neutral: calibrated (mean 0, std 1) and uncorrelated with
    log(length) over the reference set, for a version that pays length a lot."""
    model = tiny_reward_model(tiny_model_dir)
    prompts, responses = reference_set(32)
    responses = [r * (1 + i % 5) for i, r in enumerate(responses)]  # lengths 1 to ~35 tokens
    lengths = log_lengths(responses)
    content = RewardModelScorer(model, eos_id=EOS)(prompts, responses)  # what the head says beside length
    pay = 3.0 * float(content.std())

    class LengthPaying(RewardModelScorer):  # a version that learned "longer is better" on top
        def raw_scores_and_lengths(self, p, r):
            scores, tokens = super().raw_scores_and_lengths(p, r)
            return scores + pay * tokens.float().log(), tokens

    calibration = calibrate(model, prompts, responses, EOS)
    assert calibration.has_length_fit
    calibration = RewardCalibration.from_scores(*LengthPaying(model, eos_id=EOS).raw_scores_and_lengths(prompts, responses))
    assert calibration.length_slope > 0
    learned = LengthPaying(model, eos_id=EOS, calibration=calibration)(prompts, responses)
    neutral = LengthPaying(model, eos_id=EOS, calibration=calibration, length_neutral=True)(prompts, responses)
    assert correlation(learned, lengths) > 0.8
    assert abs(correlation(neutral, lengths)) < 1e-4
    assert float(neutral.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(neutral.std()) == pytest.approx(1.0, abs=1e-4)
    assert correlation(neutral, content) > max(correlation(learned, content), 0.5)


def test_a_length_fit_travels_through_a_manifest_and_an_old_manifest_has_none():
    scores, tokens = torch.tensor([1.0, 2.0, 4.0, 3.0]), torch.tensor([2, 4, 8, 8])
    calibration = RewardCalibration.from_scores(scores, tokens)
    assert calibration.has_length_fit
    assert RewardCalibration.from_dict(json.loads(json.dumps(calibration.to_dict()))) == calibration
    old = RewardCalibration.from_dict({"mean": 1.0, "std": 2.0, "count": 10})  # written before length fits
    assert not old.has_length_fit
    assert torch.equal(old.normalize_length_neutral(scores, tokens), old.normalize(scores))
    with pytest.raises(ValueError, match="completion lengths"):
        RewardCalibration.from_scores(scores, torch.tensor([2, 4]))
    with pytest.raises(ValueError, match="length fit"):
        RewardModelScorer(torch.nn.Linear(1, 1), eos_id=EOS, calibration=old, length_neutral=True)
