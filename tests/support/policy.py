"""Test data for policy runs: a reward-model version on a tiny backbone, served group records, and
settings for a tiny, quick PPO run."""

from __future__ import annotations

import json
import time
from dataclasses import asdict

import pytest
import torch

from flywheel.contracts.artifacts import REWARD_MODEL_KIND, REWARD_MODEL_MEMBER_FILES, REWARD_MODEL_MEMBERS
from flywheel.contracts.keys import group_key
from flywheel.registry import open_registry
from flywheel.config import FlywheelConfig
from training.reward_model import RewardModel, RewardModelConfig

TOPICS = ["the weather", "a recipe", "prime numbers", "a poem", "the train times", "a bug report", "the budget",
          "a summary", "the meeting", "a translation", "the garden", "a bicycle", "the ocean", "a library"]


def promote_reward_model(client, settings: FlywheelConfig, seed: int = 0) -> int:
    """A reward model with fresh heads on the tiny backbone (both members, an identity calibration
    with a flat length fit), registered and promoted."""
    config = RewardModelConfig(backbone=settings.model, trainable_layers=0, max_length=128, autocast_dtype="float32")
    members = {}
    for offset, member in enumerate(REWARD_MODEL_MEMBERS):
        torch.manual_seed(seed + offset)
        members[member] = RewardModel.from_backbone(config)

    def write(folder):
        for member, model in members.items():
            model.save(folder, file_name=REWARD_MODEL_MEMBER_FILES[member])

    manifest = {"model": asdict(config), "parent": None,
                "members": {m: {"file": REWARD_MODEL_MEMBER_FILES[m], "calibration": {
                    "mean": 0.0, "std": 1.0, "count": 2, "length_slope": 0.0, "length_center": 0.0, "residual_std": 1.0}}
                            for m in REWARD_MODEL_MEMBERS}}
    registry = open_registry(client, settings.data_dir, REWARD_MODEL_KIND)
    record = registry.write_version(write, manifest)
    registry.promote(record.version, "test", "a reward model for the policy tests")
    return record.version


def store_served_groups(client, tokenizer, count: int, prefix: str = "g") -> None:
    """Group records as the server stores them: the rendered prompt and its token ids."""
    for i in range(count):
        text = tokenizer.apply_chat_template([{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}, "
                                                                          f"part {i}."}],
                                             tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        group = {"group_id": f"{prefix}{i}", "policy_version": 0, "prompt": text, "prompt_token_ids": ids,
                 "params": {"n": 2}, "created_at": time.time(), "completions": []}
        client.set(group_key(f"{prefix}{i}"), json.dumps(group), ex=3600)


TINY_PPO = {
    "policy_iterations": "1", "policy_batch_size": "8", "policy_mini_batch_size": "4", "policy_ppo_epochs": "2",
    "policy_response_length": "4", "policy_autocast": "float32", "policy_min_prompts": "4",
    "policy_heldout_fraction": "0.25", "policy_max_heldout": "4", "policy_learning_rate": "0.001",
    "policy_lora_rank": "4", "policy_min_reward_gain": "-1000", "policy_kl_budget": "1000000",
    "policy_perplexity_margin": "1000",
}


@pytest.fixture
def one_thread():
    """Tiny matmuls: a second thread only adds synchronization (and other jobs share the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
