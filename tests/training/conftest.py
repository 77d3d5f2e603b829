"""Fixtures of the algorithm tests: tiny policies and reward models built from a config."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls: a second thread only adds synchronization (and other jobs share the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def sharp_tiny_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with embeddings × 6, so its next-token distributions are far from uniform
    (a random 64-wide model is otherwise nearly uniform over 49 k tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("sharp-tiny")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(6.0)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


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
    from training.policy_prompts import render_prompt

    return [render_prompt(policy.tokenizer, "Tell me" + " more" * (i % 5) + f" about number {i}.") for i in range(count)]
