"""The policy module: adapters on the top layers, the cached frozen prefix, π_ref = adapters off."""

from __future__ import annotations

import pytest
import torch

from flywheel.contracts.prompts import render_prompt
from training.policy_model import PolicyModelConfig, PolicyWithValueHead, Prompt, response_mask_until_eos


def test_the_cached_frozen_prefix_gives_the_same_logits_and_values_as_a_full_forward(tiny_model_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=True))
    policy = PolicyWithValueHead(lm, tokenizer, PolicyModelConfig("tiny", lora_layers=2, autocast_dtype="float32"))
    assert policy.frozen_layers == 2
    adapted = {n.split(".layers.")[1].split(".")[0] for n, p in policy.named_parameters() if "lora_" in n}
    assert adapted == {"2", "3"}  # the top two layers only
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_()  # so that π differs from π_ref

    prompts = [Prompt(*render_prompt(tokenizer, "hello" + " there" * i)) for i in range(4)]  # different lengths: left padding
    query_responses, attention_mask, responses, mask = policy.generate(prompts, 6)
    frozen = policy.frozen_prefix(query_responses, attention_mask)
    logits, values = policy(query_responses, attention_mask, 6)
    cached_logits, cached_values = policy(query_responses, attention_mask, 6, frozen)
    assert torch.allclose(logits, cached_logits, atol=1e-5) and torch.allclose(values, cached_values, atol=1e-5)
    reference = policy.reference_logits(query_responses, attention_mask, 6)
    assert torch.allclose(reference, policy.reference_logits(query_responses, attention_mask, 6, frozen), atol=1e-5)
    assert not torch.allclose(reference, logits, atol=1e-3)
    assert torch.isfinite(logits).all()


def test_a_response_is_masked_after_its_eos():
    eos = 2
    responses = torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]])
    assert response_mask_until_eos(responses, eos).long().tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_full_fine_tuning_trains_every_weight_against_a_frozen_reference_and_saves_a_whole_model(
        tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from training.ppo import PPOConfig, PPOTrainer

    torch.manual_seed(0)
    policy = PolicyWithValueHead.from_pretrained(
        PolicyModelConfig(str(tiny_model_dir), finetune="full", autocast_dtype="float32"))
    assert policy.reference_lm is not None and not any(p.requires_grad for p in policy.reference_lm.parameters())
    prompts = [Prompt(*render_prompt(policy.tokenizer, f"Say {i}.")) for i in range(4)]
    config = PPOConfig(batch_size=4, mini_batch_size=2, rollout_batch_size=4, response_length=3, learning_rate=1e-2)
    stats = PPOTrainer(policy, lambda p, r: torch.ones(len(r)), config).step(prompts)
    assert stats.kl_to_ref == pytest.approx(0.0, abs=1e-5)  # measured on the rollout, before the update

    assert policy.save(tmp_path) == "full"
    assert {p.name for p in tmp_path.iterdir()} == {"model.safetensors", "config.json", "value_head.safetensors"}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trained = policy.lm.state_dict()
    assert torch.allclose(reloaded.state_dict()["model.norm.weight"], trained["model.norm.weight"])
    assert not torch.allclose(reloaded.state_dict()["model.norm.weight"], base.state_dict()["model.norm.weight"])
