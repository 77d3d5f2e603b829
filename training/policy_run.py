"""One PPO run, end to end.

1. Take the run lock (one policy run at a time; a dead worker's lock expires).
2. Load the current reward model (no reward model yet: skip).
3. Collect prompts: the served groups in Redis plus the optional prompt file; split off the
   held-out slice by a hash of the prompt.
4. Start from the current policy (its LoRA adapter and value head, when it was trained on the
   same base), evaluate it on the held-out prompts, run ``policy_iterations`` PPO iterations,
   evaluate the candidate.
5. Write the candidate as a new version (temp folder + rename, checksums in the manifest), then
   promote it if it passes the gate, else mark it rejected with its figures.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import asdict
from pathlib import Path

import redis as redis_lib
import torch

from flywheel.contracts.artifacts import POLICY_KIND, REWARD_MODEL_KIND, REWARD_MODEL_WEIGHTS_FILE, verify_version
from flywheel.contracts.heldout import split_prompts
from flywheel.contracts.keys import POLICY_RUN_LOCK_KEY
from flywheel.models import resolve_compute_dtype, resolve_model_path
from flywheel.registry import VersionRecord, open_registry
from flywheel.run_lock import RunLock, run_exclusively
from flywheel.settings import Settings
from training.metrics import PPOMetrics
from training.policy_gate import PolicyGateConfig, evaluate_policy, gate_decision, perplexity
from training.policy_model import LORA, PolicyModelConfig, PolicyWithValueHead
from training.policy_prompts import DEFAULT_HELDOUT_CORPUS, DEFAULT_PTX_CORPUS, file_prompts, load_texts, served_prompts
from training.policy_reward import RewardModelScorer
from training.ppo import PPOConfig, PPOStats, PPOTrainer
from training.reward_model import RewardModel, RewardModelConfig
from training.reward_model_run import RunReport

log = logging.getLogger(__name__)


def policy_model_config(settings: Settings) -> PolicyModelConfig:
    return PolicyModelConfig(base_model=str(resolve_model_path(settings.model, Path(settings.data_dir))),
                             finetune=settings.policy_finetune, lora_rank=settings.policy_lora_rank,
                             lora_alpha=settings.policy_lora_alpha,
                             lora_layers=settings.policy_lora_layers, autocast_dtype=resolve_compute_dtype(settings.policy_autocast))


def ppo_config(settings: Settings) -> PPOConfig:
    return PPOConfig(batch_size=settings.policy_batch_size, mini_batch_size=settings.policy_mini_batch_size,
                     rollout_batch_size=settings.policy_batch_size, ppo_epochs=settings.policy_ppo_epochs,
                     response_length=settings.policy_response_length, temperature=settings.policy_temperature,
                     learning_rate=settings.policy_learning_rate, kl_coef=settings.policy_kl_coef,
                     kl_target=settings.policy_kl_target or None, ptx_coef=settings.policy_ptx_coef,
                     seed=int(time.time()))


def gate_config(settings: Settings) -> PolicyGateConfig:
    return PolicyGateConfig(min_reward_gain=settings.policy_min_reward_gain, kl_budget=settings.policy_kl_budget,
                            perplexity_margin=settings.policy_perplexity_margin,
                            response_length=settings.policy_response_length)


class PolicyModelCache:
    """Keeps the policy (base model + adapters) and the reward model loaded in a worker between
    runs; a LoRA policy is reset to the base in place."""

    def __init__(self) -> None:
        self._policy_key = None
        self._policy: PolicyWithValueHead | None = None
        self._reward_key = None
        self._reward: RewardModel | None = None

    def policy(self, config: PolicyModelConfig) -> PolicyWithValueHead:
        key = repr(asdict(config))
        if self._policy_key == key and config.finetune == LORA:
            self._policy.reset_adapters()
        else:
            torch.manual_seed(0)
            self._policy = PolicyWithValueHead.from_pretrained(config)
            self._policy_key = key
        return self._policy

    def reward_model(self, record: VersionRecord, folder: Path) -> RewardModel:
        key = (record.version, str(folder))
        if self._reward_key != key:
            stored = dict(record.manifest.get("model", {}))
            config = RewardModelConfig(backbone=stored["backbone"],
                                       trainable_layers=int(stored.get("trainable_layers", 4)),
                                       max_length=int(stored.get("max_length", 512)),
                                       autocast_dtype=stored.get("autocast_dtype", "float32"))
            verify_version(folder)  # a corrupt reward model is refused, not trained against
            model = RewardModel.from_backbone(config)
            model.load_stored(folder / REWARD_MODEL_WEIGHTS_FILE)
            model.requires_grad_(False)
            self._reward, self._reward_key = model.eval(), key
        return self._reward


def run_policy_training(settings: Settings, client: redis_lib.Redis, *, who: str = "",
                        metrics: PPOMetrics | None = None, cache: PolicyModelCache | None = None,
                        iterations: int | None = None) -> RunReport:
    """One PPO run (see the module docstring); skipped when another run holds the lock."""
    who = who or f"{socket.gethostname()}:{os.getpid()}"
    lock = RunLock(client, POLICY_RUN_LOCK_KEY, settings.policy_lock_seconds)
    iterations = settings.policy_iterations if iterations is None else iterations
    return run_exclusively(lock, metrics, "policy", RunReport("skipped", "another policy run holds the lock"),
                           lambda started: _run_locked(settings, client, who, metrics, cache or PolicyModelCache(),
                                                       iterations, started))


def _run_locked(settings: Settings, client: redis_lib.Redis, who: str, metrics: PPOMetrics | None,
                cache: PolicyModelCache, iterations: int, started: float) -> RunReport:
    rewards = open_registry(client, settings.data_dir, REWARD_MODEL_KIND)
    reward_record = rewards.current()
    if reward_record is None:
        return RunReport("skipped", "no reward model yet")

    model_config = policy_model_config(settings)
    policy = cache.policy(model_config)
    prompts = served_prompts(client, policy.tokenizer, settings.policy_max_prompts)
    if settings.policy_prompts_file:
        prompts += file_prompts(Path(settings.policy_prompts_file), policy.tokenizer)
    train_prompts, held_out = split_prompts(prompts, settings.policy_heldout_fraction)
    held_out = held_out[:settings.policy_max_heldout]
    if len(train_prompts) < max(settings.policy_min_prompts, 1):
        return RunReport("skipped", f"{len(train_prompts)} training prompts, fewer than {settings.policy_min_prompts}")
    if not held_out:  # tiny traffic: evaluate on a few training prompts rather than on nothing
        held_out = train_prompts[:settings.policy_max_heldout]

    registry = open_registry(client, settings.data_dir, POLICY_KIND)
    current = registry.current()
    parent = _warm_start(policy, registry, current, model_config)
    reward_model = cache.reward_model(reward_record, rewards.path(reward_record.version))
    scorer = RewardModelScorer(reward_model, eos_id=policy.eos_id, pad_id=policy.pad_id)
    ppo = ppo_config(settings)
    gate = gate_config(settings)
    heldout_text = policy.text_batches(load_texts(Path(settings.policy_heldout_corpus or DEFAULT_HELDOUT_CORPUS)),
                                       8, 256)
    ptx_texts = load_texts(Path(settings.policy_ptx_corpus or DEFAULT_PTX_CORPUS)) if ppo.ptx_coef > 0 else []
    log.info("policy run: %d training and %d held-out prompts, reward model v%d, start from %s, %.2f M trained "
             "parameters (%s)", len(train_prompts), len(held_out), reward_record.version,
             f"v{parent}" if parent else "the base model", policy.trainable_parameter_count() / 1e6,
             model_config.finetune)

    reference_perplexity = perplexity(policy, heldout_text, reference=True)
    before = evaluate_policy(policy, scorer, held_out, heldout_text, gate)
    trainer = PPOTrainer(policy, scorer, ppo, ptx_texts=ptx_texts,
                         progress=_progress_reporter(metrics, ppo.batch_size, time.monotonic()))
    result = trainer.train(train_prompts, iterations)
    after = evaluate_policy(policy, scorer, held_out, heldout_text, gate)
    decision = gate_decision(after, before, reference_perplexity, policy.all_finite(), gate)

    last: PPOStats | None = result.last
    figures = decision.figures | ({f"train_{k}": v for k, v in last.to_dict().items() if v is not None} if last else {})
    figures["train_seconds"] = result.seconds
    manifest = {
        "base_model": model_config.base_model,
        "reward_model_version": reward_record.version,
        "parent": parent,
        "current_at_start": current.version if current else 0,
        "created_by": who,
        "created_at": time.time(),
        "figures": figures,
        "prompts": {"train": len(train_prompts), "held_out": len(held_out),
                    "prompts_file": settings.policy_prompts_file or None},
        "model": asdict(model_config),
        "ppo": asdict(ppo) | {"iterations": iterations},
        "gate": asdict(gate) | {"passed": decision.passed, "why": decision.why},
        "iterations": [s.to_dict() for s in result.iterations],
        "duration_seconds": time.monotonic() - started,
    }

    def write_artifacts(folder: Path) -> None:
        manifest["format"] = policy.save(folder)  # the registry adds every file's checksum

    record = registry.write_version(write_artifacts, manifest)
    if decision.passed:
        registry.promote(record.version, who, decision.why)
    else:
        registry.reject(record.version, who, decision.why, decision.figures)
    if metrics is not None:
        for gauge, name in ((metrics.gate_reward_gain, "reward_gain"), (metrics.gate_kl_to_ref, "kl_to_ref"),
                            (metrics.gate_perplexity_ratio, "perplexity_ratio")):
            if isinstance(decision.figures[name], float):
                gauge.set(decision.figures[name])
        metrics.current_version.set(registry.current_version())
    return RunReport("promoted" if decision.passed else "rejected", decision.why, record.version, figures)


def _warm_start(policy: PolicyWithValueHead, registry, current: VersionRecord | None,
                config: PolicyModelConfig) -> int:
    """Load the current version into the policy when it was trained the same way on the same base;
    returns the parent version (0 = the base model)."""
    if current is None:
        return 0
    manifest = current.manifest
    if manifest.get("format") != config.finetune or manifest.get("base_model") != config.base_model:
        log.warning("current policy v%d is a %s version of %s; this run trains %s on %s from the base",
                    current.version, manifest.get("format"), manifest.get("base_model"), config.finetune,
                    config.base_model)
        return current.version
    policy.load_version(registry.path(current.version), manifest["format"])
    return current.version


def _progress_reporter(metrics: PPOMetrics | None, batch_size: int, started: float):
    def report(iteration: int, total: int, eta: float, stats: PPOStats) -> None:
        if metrics is None:
            return
        metrics.mean_score.set(stats.mean_score)
        metrics.mean_reward.set(stats.mean_reward)
        metrics.kl_to_ref.set(stats.kl_to_ref)
        metrics.kl_coef.set(stats.kl_coef)
        metrics.policy_loss.set(stats.policy_loss)
        metrics.value_loss.set(stats.value_loss)
        metrics.clipfrac.set(stats.clipfrac)
        metrics.approx_kl.set(stats.approx_kl)
        metrics.entropy.set(stats.entropy)
        metrics.progress.set(iteration / total)
        metrics.episodes_per_second.set(iteration * batch_size / max(time.monotonic() - started, 1e-9))
        metrics.eta.set(eta)
        metrics.episodes.inc(stats.episodes)
        metrics.iterations.inc()
    return report
