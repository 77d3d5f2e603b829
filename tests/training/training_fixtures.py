"""Helpers of the algorithm tests: tiny policies built from a config (see conftest.py for the
fixtures)."""

from __future__ import annotations

import torch


def tiny_policy(model_dir, autocast_dtype: str = "float32", perturb: bool = False, **config):
    """A LoRA policy on a tiny model; ``perturb`` gives its adapters random B matrices so π ≠ π_ref."""
    from training.policy_model import PolicyModelConfig, PolicyWithValueHead

    torch.manual_seed(0)
    policy = PolicyWithValueHead.from_pretrained(
        PolicyModelConfig(str(model_dir), lora_rank=4, autocast_dtype=autocast_dtype, **config))
    if perturb:
        with torch.no_grad():
            for name, parameter in policy.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(std=0.5)
    return policy


def tiny_prompts(policy, count: int):
    """Chat-rendered prompts of different lengths (so a batch is left-padded)."""
    from flywheel.contracts.prompts import render_prompt
    from training.policy_model import Prompt

    return [Prompt(*render_prompt(policy.tokenizer, "Tell me" + " more" * (i % 5) + f" about number {i}."))
            for i in range(count)]
