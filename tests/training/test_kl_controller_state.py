"""Defect 9 (mechanics): the adaptive KL controller's state is exported and restored (a run
continues from the β the last one reached), and its horizon is the run's size, not 10,000."""

from __future__ import annotations

import json

import pytest
import torch

from support.policy import one_thread  # noqa: F401 (fixture)
from training_fixtures import tiny_policy, tiny_prompts
from training.ppo import AdaptiveKLController, FixedKLController, PPOConfig, PPOTrainer, kl_controller

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_adaptive_controller_continues_from_its_stored_state():
    controller = AdaptiveKLController(0.1, target=6.0, horizon=256)
    controller.update(current_kl=12.0, n_steps=32)
    state = json.loads(json.dumps(controller.state_dict()))
    assert state == {"kind": "adaptive", "value": pytest.approx(0.1 * (1 + 0.2 * 32 / 256)), "target": 6.0,
                     "horizon": 256}
    restored = AdaptiveKLController.from_state(state)
    assert (restored.value, restored.target, restored.horizon) == (controller.value, 6.0, 256)
    resized = AdaptiveKLController.from_state(state, target=4.0, horizon=64)
    assert (resized.value, resized.target, resized.horizon) == (controller.value, 4.0, 64)
    with pytest.raises(ValueError):
        AdaptiveKLController.from_state({"value": float("nan"), "target": 6.0, "horizon": 1})
    assert FixedKLController(0.05).state_dict() == {"kind": "fixed", "value": 0.05}


def test_the_config_chooses_the_controller_and_a_stored_beta_seeds_it():
    assert isinstance(kl_controller(PPOConfig(kl_coef=0.05)), FixedKLController)
    adaptive = kl_controller(PPOConfig(kl_coef=0.05, kl_target=6.0, batch_size=32))
    assert (adaptive.value, adaptive.target, adaptive.horizon) == (0.05, 6.0, 32)
    continued = kl_controller(PPOConfig(kl_coef=0.05, kl_target=4.0, kl_horizon=500),
                              {"kind": "adaptive", "value": 0.2, "target": 6.0, "horizon": 256})
    assert (continued.value, continued.target, continued.horizon) == (0.2, 4.0, 500)


def test_a_run_sizes_the_horizon_to_itself_and_hands_its_state_to_the_next(sharp_tiny_model_dir):
    policy = tiny_policy(sharp_tiny_model_dir)
    prompts = tiny_prompts(policy, 4)
    config = PPOConfig(batch_size=4, mini_batch_size=4, rollout_batch_size=4, response_length=3, ppo_epochs=1,
                       kl_coef=0.1, kl_target=6.0)
    zero = lambda prompt_ids, response_ids: torch.zeros(len(response_ids))  # noqa: E731
    trainer = PPOTrainer(policy, zero, config)
    result = trainer.train(prompts, iterations=2)
    assert trainer.kl_controller.horizon == 2 * 4
    # the first iteration's KL is 0 (π = π_ref): β falls by 0.2 · 4/8 at once, not by 0.2 · 4/10000
    assert result.iterations[1].kl_coef == pytest.approx(0.1 * 0.9)
    assert result.kl_state == trainer.kl_controller.state_dict() and result.kl_state["value"] < 0.09

    following = PPOTrainer(policy, zero, config, kl_state=json.loads(json.dumps(result.kl_state)))
    assert following.kl_controller.value == result.kl_state["value"]
