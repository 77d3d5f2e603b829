"""Defect 1 (mechanics): a reward-model version is calibrated over a reference set of (prompt,
completion) token ids, and the scorer returns (raw − mean) / std: mean 0 and standard deviation 1
there, whatever offset the version's training left."""

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
