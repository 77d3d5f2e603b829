"""The server's engine and both trainers on a device (issue 13's GPU path): the model, the caches
and the rollouts live where ``device`` says, and what they compute matches the CPU's. Each test
runs on the CPU everywhere and on CUDA where a GPU is present (``conftest.DEVICES``)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flywheel.contracts.prompts import render_prompt
from flywheel.models import load_model, resolve_dtype
from serving.engine import DoneEvent, Engine, EngineConfig, GenerationRequest, iter_events
from serving.sampling import SamplingParams
from support.devices import DEVICES
from support.synthetic import synthetic_rankings
from training.policy_model import PolicyModelConfig, PolicyWithValueHead, Prompt
from training.ppo import PPOConfig, PPOTrainer
from training.reward_model import RewardModel, RewardModelConfig
from training.reward_trainer import RewardModelTrainer, RewardTrainingConfig

pytestmark = pytest.mark.parametrize("device", DEVICES)

PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog and", "Tell me about the sea " * 4, "x y z"]


def test_load_model_places_the_model_on_the_device_in_the_dtype_auto_picks_for_it(small_model_dir, device):
    loaded = load_model(str(small_model_dir), small_model_dir, "auto", device)
    parameter = next(loaded.model.parameters())
    assert parameter.device.type == device
    assert parameter.dtype == loaded.dtype == resolve_dtype("auto", device)


def test_the_engine_on_the_device_decodes_what_generate_decodes_on_the_cpu(small_model_dir, device):
    """Left-padded rows of four lengths, n=2 each, a shared prompt prefix: the greedy tokens equal
    transformers' ``generate`` on the CPU, token for token."""
    loaded = load_model(str(small_model_dir), small_model_dir, "float32", device)
    tok = loaded.tokenizer
    engine = Engine(loaded.model, tok, EngineConfig(max_batch_sequences=16))
    engine.start()
    try:
        requests = [GenerationRequest(p, tok(p).input_ids, SamplingParams(n=2, max_new_tokens=12, min_new_tokens=12,
                                                                         temperature=0.0))
                    for p in PROMPTS + [PROMPTS[2] + "and the sky"]]
        for r in requests:
            engine.submit(r)
        results = [next(e for e in iter_events(r) if isinstance(e, DoneEvent)).result for r in requests]
        cache = engine.runner.current.cache
        assert cache.layers[0].keys is None or cache.layers[0].keys.device.type == device
    finally:
        engine.stop()
    reference = AutoModelForCausalLM.from_pretrained(small_model_dir, dtype=torch.float32).eval()
    for request, result in zip(requests, results):
        ids = torch.tensor([request.prompt_token_ids])
        with torch.inference_mode():
            expected = reference.generate(ids, do_sample=False, max_new_tokens=12, min_new_tokens=12,
                                          pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        assert [s.token_ids for s in result.samples] == [expected, expected]


def test_a_seeded_sampled_request_draws_the_same_tokens_on_the_device_as_on_the_cpu(small_model_dir, device):
    """Sampling happens on the host with the request's own generator: the device changes nothing."""
    def sampled(on: str) -> list[list[int]]:
        loaded = load_model(str(small_model_dir), small_model_dir, "float32", on)
        engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(max_batch_sequences=8))
        engine.start()
        try:
            request = GenerationRequest("Hello", loaded.tokenizer("Hello").input_ids,
                                        SamplingParams(n=3, max_new_tokens=10, temperature=0.7, seed=11))
            engine.submit(request)
            result = next(e for e in iter_events(request) if isinstance(e, DoneEvent)).result
        finally:
            engine.stop()
        return [s.token_ids for s in result.samples]

    assert sampled(device) == sampled("cpu")


def test_ppo_rolls_out_and_updates_on_the_device(small_model_dir, device):
    torch.manual_seed(0)
    policy = PolicyWithValueHead.from_pretrained(
        PolicyModelConfig(str(small_model_dir), lora_rank=4, lora_layers=1, autocast_dtype="float32"), device)
    assert policy.device.type == device
    prompts = [Prompt(*render_prompt(policy.tokenizer, f"Say something about number {i}.")) for i in range(8)]
    rewarded = set(range(0, len(policy.tokenizer), 2))

    def reward(prompt_ids, response_ids):  # a host tensor, as the reward models return
        return torch.tensor([sum(t in rewarded for t in r) / max(len(r), 1) for r in response_ids])

    config = PPOConfig(batch_size=8, mini_batch_size=4, rollout_batch_size=8, response_length=6, learning_rate=5e-3,
                       ppo_epochs=2, samples_per_prompt=2, seed=0, ptx_coef=0.5, ptx_batch_size=2, ptx_max_length=16)
    trainer = PPOTrainer(policy, reward, config, ptx_texts=["The sea is blue and the sky is wide."] * 2)
    rollout = trainer.rollout([p for p in prompts[:4] for _ in range(2)])
    for tensor in (rollout.query_responses, rollout.logprobs, rollout.ref_logprobs, rollout.scores, rollout.truncated):
        assert tensor.device.type == device
    before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    result = trainer.train(prompts, iterations=2)
    assert len(result.iterations) == 2
    stats = result.last
    assert all(torch.isfinite(torch.tensor(v)) for v in (stats.policy_loss, stats.entropy, stats.kl_to_ref))
    assert stats.ptx_loss is not None
    changed = [n for n, p in policy.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed and policy.all_finite()


def test_the_gate_evaluates_a_policy_on_the_device(small_model_dir, device, tmp_path):
    pytest.importorskip("redis")  # training.policy_gate reaches training.run, which imports it
    from training.policy_gate import PolicyGateConfig, evaluate_policy

    policy = PolicyWithValueHead.from_pretrained(
        PolicyModelConfig(str(small_model_dir), lora_rank=4, autocast_dtype="float32"), device)
    prompts = [Prompt(*render_prompt(policy.tokenizer, f"Name {i} things.")) for i in range(4)]
    texts = policy.text_batches(["A short held-out text about the weather."], 2, 32)
    evaluation = evaluate_policy(policy, {"judge": lambda p, r: torch.ones(len(r))}, prompts, texts,
                                 PolicyGateConfig(response_length=5, samples_per_prompt=2))
    assert evaluation.kl_to_ref == pytest.approx(0.0, abs=1e-5)  # fresh adapters: π = π_ref
    assert evaluation.mean_score("judge") == 1.0 and evaluation.perplexity > 1.0
    policy.save(tmp_path)  # artifacts are written from host copies
    assert (tmp_path / "value_head.safetensors").exists()


def test_the_reward_model_trains_on_the_device_and_answers_on_the_host(small_model_dir, device, tmp_path):
    torch.manual_seed(0)
    config = RewardModelConfig(str(small_model_dir), trainable_layers=1, max_length=64, autocast_dtype="float32")
    model = RewardModel.from_backbone(config, device)
    assert model.device.type == device
    trainer = RewardModelTrainer(model, AutoTokenizer.from_pretrained(small_model_dir),
                                 RewardTrainingConfig(learning_rate=3e-3, epochs=2, batch_rankings=4))
    held_out = synthetic_rankings(16, seed=99)
    assert trainer.fit_head(synthetic_rankings(40, seed=2)) is not None  # the probe: host features, head on device
    stats = trainer.train(synthetic_rankings(32, seed=1))
    assert stats.pairs > 0 and torch.isfinite(torch.tensor(stats.loss))
    after = trainer.evaluate(held_out)
    assert after.accuracy > 0.6, after  # shorter wins is learnable even by a tiny backbone
    scores = trainer.score("<|im_start|>user\nhi<|im_end|>\n", ["short", "a much longer answer than that"])
    assert len(scores) == 2
    names = model.save(tmp_path)
    assert "reward_head.weight" in names
