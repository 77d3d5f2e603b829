"""One PPO run, end to end.

1. Take the run lock (one policy run at a time; a dead worker's lock expires).
2. Load the current reward model's two members, calibrated (no reward model yet: skip): PPO
   optimises the ``policy`` member; the gate measures with the ``judge``, trained on other groups.
3. Collect prompts: the served groups in Redis plus the optional prompt file; split off the
   held-out slice by a hash of the prompt (no held-out prompts: skip, never judge on training ones).
4. Start from the current policy (its LoRA adapter and value head, when it was trained on the
   same base) and the last run's adaptive-KL state, evaluate it on the held-out prompts, run
   ``policy_iterations`` PPO iterations, evaluate the candidate (``training.policy_gate``: several
   samples per prompt, paired by a seed drawn for this run).
5. Write the candidate as a new version (temp folder + rename, checksums in the manifest), then
   promote it if it passes the gate, else mark it rejected with its figures.

Steps 1, 4 and 5 are the skeleton every run shares (``training.run.TrainingRun``); ``PolicyRun``
fills in the rest. PPO's seed is ``policy_seed``, or one drawn afresh for each run; either way it
is in the version's manifest (``ppo.seed``), so a run can be repeated.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import asdict
from pathlib import Path

import redis as redis_lib
import torch

from flywheel.config import FlywheelConfig, PolicyRunConfig
from flywheel.contracts.artifacts import (POLICY_KIND, POLICY_MEMBER, REWARD_MODEL_KIND, REWARD_MODEL_MEMBER_FILES,
                                          REWARD_MODEL_MEMBERS, verify_version)
from flywheel.contracts.heldout import split_prompts
from flywheel.contracts.keys import POLICY_RUN_LOCK_KEY
from flywheel.models import resolve_compute_dtype, resolve_device, resolve_model_path
from flywheel.registry import VersionRecord, open_registry
from flywheel.run_ledger import RunAttempt
from training.metrics import PPOMetrics
from training.policy_gate import (GateDecision, PolicyEvaluation, PolicyGateConfig, evaluate_policy, gate_decision,
                                  perplexity)
from training.policy_model import LORA, PolicyModelConfig, PolicyWithValueHead
from training.policy_prompts import (DEFAULT_HELDOUT_CORPUS, DEFAULT_PTX_CORPUS, file_prompts, gate_rankings,
                                     load_texts, served_groups, served_prompts, stored_groups)
from training.policy_reward import RewardModelScorer
from training.reward_model import RewardCalibration
from training.ppo import PPOConfig, PPOStats, PPOTrainer
from training.rankings import Ranking
from training.reward_model import RewardModel, RewardModelConfig
from training.reward_model_run import replay_store
from training.run import RunReport, TrainingRun

log = logging.getLogger(__name__)


def policy_model_config(config: FlywheelConfig) -> PolicyModelConfig:
    """The policy a run trains: the served base model with the adapters its section asks for."""
    section = config.policy
    return PolicyModelConfig(base_model=str(resolve_model_path(config.model, Path(config.data_dir))),
                             finetune=section.finetune, lora_rank=section.lora_rank, lora_alpha=section.lora_alpha,
                             lora_layers=section.lora_layers,
                             autocast_dtype=resolve_compute_dtype(section.autocast, resolve_device(config.device)))


def ppo_config(section: PolicyRunConfig, seed: int) -> PPOConfig:
    return PPOConfig(batch_size=section.batch_size, mini_batch_size=section.mini_batch_size,
                     rollout_batch_size=section.batch_size, ppo_epochs=section.ppo_epochs,
                     response_length=section.response_length, temperature=section.temperature,
                     learning_rate=section.learning_rate, kl_coef=section.kl_coef,
                     kl_target=section.kl_target or None, kl_stop=section.kl_stop, ptx_coef=section.ptx_coef,
                     advantage_estimator=section.advantage_estimator, samples_per_prompt=section.samples_per_prompt,
                     critic_warmup_iterations=section.critic_warmup_iterations,
                     missing_eos_penalty=section.missing_eos_penalty, served_epochs=section.served_epochs, seed=seed)


def gate_config(section: PolicyRunConfig, seed: int) -> PolicyGateConfig:
    return PolicyGateConfig(min_reward_gain=section.min_reward_gain, kl_budget=section.kl_budget,
                            perplexity_margin=section.perplexity_margin, response_length=section.response_length,
                            temperature=section.temperature, samples_per_prompt=section.gate_samples_per_prompt,
                            seed=seed)


class PolicyModelCache:
    """Keeps the policy (base model + adapters) and the reward model loaded in a worker between
    runs; a LoRA policy is reset to the base in place."""

    def __init__(self) -> None:
        self._policy_key = None
        self._policy: PolicyWithValueHead | None = None
        self._rewards: dict[str, tuple[tuple, RewardModel]] = {}

    def policy(self, config: PolicyModelConfig, device: torch.device | str = "cpu") -> PolicyWithValueHead:
        key = (repr(asdict(config)), str(device))
        if self._policy_key == key and config.finetune == LORA:
            self._policy.reset_adapters()
        else:
            torch.manual_seed(0)
            self._policy = PolicyWithValueHead.from_pretrained(config, device)
            self._policy_key = key
        return self._policy

    @property
    def loaded_policy(self) -> PolicyWithValueHead | None:
        """The policy as the last run left it (its trained adapters), without a reset."""
        return self._policy

    def reward_model(self, record: VersionRecord, folder: Path, member: str = POLICY_MEMBER,
                     device: torch.device | str = "cpu") -> RewardModel:
        key = (record.version, str(folder), str(device))
        cached = self._rewards.get(member)
        if cached is None or cached[0] != key:
            stored = dict(record.manifest.get("model", {}))
            config = RewardModelConfig(backbone=stored["backbone"],
                                       trainable_layers=int(stored.get("trainable_layers", 4)),
                                       max_length=int(stored.get("max_length", 512)),
                                       autocast_dtype=stored.get("autocast_dtype", "float32"),
                                       pooling=stored.get("pooling", "last"))  # versions before pooling: last
            verify_version(folder)  # a corrupt reward model is refused, not trained against
            model = RewardModel.from_backbone(config, device)
            model.load_stored(folder / REWARD_MODEL_MEMBER_FILES[member])
            model.requires_grad_(False)
            self._rewards[member] = (key, model.eval())
        return self._rewards[member][1]


def run_policy_training(config: FlywheelConfig, client: redis_lib.Redis, *, who: str = "",
                        metrics: PPOMetrics | None = None, cache: PolicyModelCache | None = None,
                        iterations: int | None = None, attempt: RunAttempt | None = None) -> RunReport:
    """One PPO run (see the module docstring); skipped when another run holds the lock."""
    return PolicyRun(config, client, who=who, metrics=metrics, cache=cache or PolicyModelCache(),
                     iterations=config.policy.iterations if iterations is None else iterations,
                     attempt=attempt).run()


class PolicyRun(TrainingRun):
    """The steps of one PPO run (``TrainingRun`` orders them)."""

    name = "policy"
    lock_key = POLICY_RUN_LOCK_KEY
    compares_with_base = True

    def __init__(self, config: FlywheelConfig, client: redis_lib.Redis, *, who: str, metrics: PPOMetrics | None,
                 cache: PolicyModelCache, iterations: int, attempt: RunAttempt | None = None) -> None:
        super().__init__(client, open_registry(client, config.data_dir, POLICY_KIND),
                         lock_seconds=config.policy.lock_seconds, who=who, metrics=metrics, attempt=attempt)
        self.config = config
        self.section = config.policy
        self.cache = cache
        self.iterations = iterations

    def prepare(self) -> str | None:
        section = self.section
        self.rewards = open_registry(self.client, self.config.data_dir, REWARD_MODEL_KIND)
        self.reward_record = self.rewards.current()
        if self.reward_record is None:
            return "no reward model yet"
        members = self.reward_record.manifest.get("members", {})
        if set(members) != set(REWARD_MODEL_MEMBERS):
            return (f"reward model v{self.reward_record.version} has no independent judge member (trained before "
                    "reward models had two): the gate could only judge PPO by the reward it optimised")
        self.model_config = policy_model_config(self.config)
        self.device = resolve_device(self.config.device)
        self.policy = policy = self.cache.policy(self.model_config, self.device)
        self.stored_groups = stored_groups(self.client)  # one SCAN: the prompts here, the served episodes in set_up
        prompts = served_prompts(self.stored_groups, policy.tokenizer, section.max_prompts)
        if section.prompts_file:
            prompts += file_prompts(Path(section.prompts_file), policy.tokenizer)
        self.train_prompts, held_out = split_prompts(prompts, section.heldout_fraction)
        self.held_out = held_out[:section.max_heldout]
        if len(self.train_prompts) < max(section.min_prompts, 1):
            return f"{len(self.train_prompts)} training prompts, fewer than {section.min_prompts}"
        if len(self.held_out) < 2:  # the gate's evidence is over held-out prompts, never training ones
            return (f"{len(self.held_out)} held-out prompts (policy_heldout_fraction {section.heldout_fraction} of "
                    f"{len(prompts)} served): too few for the gate to judge a candidate on")
        return None

    def set_up(self, current: VersionRecord | None) -> None:
        section, policy = self.section, self.policy
        self.parent, starts_as = _warm_start(policy, self.registry, current, self.model_config)
        # the groups the version this run starts from served are episodes PPO need not generate
        rankings, ranking_heldout = self._rankings_by_group(), self.config.reward_model.heldout_fraction
        self.served = (served_groups(self.stored_groups, starts_as, policy.eos_id, section.response_length,
                                     section.heldout_fraction, section.served_groups,
                                     rankings if section.served_rankings else None, ranking_heldout)
                       if section.served_groups else [])
        self.gate_rankings = gate_rankings(rankings, policy.tokenizer, ranking_heldout, section.gate_rankings)
        self.stored_groups = []
        folder = self.rewards.path(self.reward_record.version)
        calibrations = {member: RewardCalibration.from_dict(entry["calibration"])
                        for member, entry in self.reward_record.manifest["members"].items()}
        self.reward_length = reward_length(section, calibrations, self.reward_record.version)
        self.scorers = {
            member: RewardModelScorer(self.cache.reward_model(self.reward_record, folder, member, self.device),
                                      eos_id=policy.eos_id,
                                      pad_id=policy.pad_id, policy_tokenizer=policy.tokenizer,
                                      calibration=calibration, length_neutral=self.reward_length == "neutral")
            for member, calibration in calibrations.items()}
        seed = secrets.randbits(31) if section.seed is None else section.seed
        self.ppo = ppo_config(section, seed)
        # a fresh seed for the gate's draws every run (sample j of both policies from seed + j): a
        # fixed one would let a run be tuned, by chance, to the gate's one set of draws
        self.gate_config = gate_config(section, secrets.randbits(31))
        self.kl_state = _last_kl_state(self.registry)
        self.heldout_text = policy.text_batches(load_texts(Path(section.heldout_corpus or DEFAULT_HELDOUT_CORPUS)),
                                                8, 256)
        self.ptx_texts = load_texts(Path(section.ptx_corpus or DEFAULT_PTX_CORPUS)) if self.ppo.ptx_coef > 0 else []
        log.info("policy run: %d training and %d held-out prompts (and %d held-out rankings), %d served samples of "
                 "v%d to learn from (%d of %d groups rewarded by the users' rankings), reward model v%d (%s), start "
                 "from %s, %.2f M trained parameters (%s), seed %d%s", len(self.train_prompts),
                 len(self.held_out), len(self.gate_rankings), sum(len(g.responses) for g in self.served), starts_as,
                 sum(g.scores is not None for g in self.served), len(self.served),
                 self.reward_record.version, _describe_reward(self.reward_length, calibrations),
                 f"v{self.parent}" if self.parent else "the base model", policy.trainable_parameter_count() / 1e6,
                 self.model_config.finetune, seed, " (drawn for this run)" if section.seed is None else "")
        self.reference_perplexity = perplexity(policy, self.heldout_text, reference=True)

    def _rankings_by_group(self) -> dict[str, list[Ranking]]:
        """The rankings reward-model runs have taken in (the replay store), by group: the users'
        verdict on served groups (``policy_served_rankings``) and the gate's held-out rankings."""
        by_group: dict[str, list[Ranking]] = {}
        for ranking in replay_store(self.config).load():
            by_group.setdefault(ranking.group_id, []).append(ranking)
        return by_group

    def evaluate(self) -> PolicyEvaluation:
        return evaluate_policy(self.policy, self.scorers, self.held_out, self.heldout_text, self.gate_config,
                               self.gate_rankings)

    def train(self) -> None:
        trainer = PPOTrainer(self.policy, self.scorers[POLICY_MEMBER], self.ppo, ptx_texts=self.ptx_texts,
                             progress=_progress_reporter(self.metrics, self.ppo.batch_size, time.monotonic()),
                             kl_state=self.kl_state)
        self.result = trainer.train(self.train_prompts, self.iterations, served=self.served)

    def gate(self, current: VersionRecord | None, before: PolicyEvaluation, after: PolicyEvaluation) -> GateDecision:
        return gate_decision(after, before, self.reference_perplexity, self.policy.all_finite(), self.gate_config)

    def manifest(self, current: VersionRecord | None, before: PolicyEvaluation, after: PolicyEvaluation,
                 decision: GateDecision, started: float) -> dict:
        result = self.result
        last: PPOStats | None = result.last
        figures = decision.figures | ({f"train_{k}": v for k, v in last.to_dict().items() if v is not None}
                                      if last else {})
        figures["train_seconds"] = result.seconds
        return {
            "base_model": self.model_config.base_model,
            "reward_model_version": self.reward_record.version,
            "reward_length": self.reward_length,
            "parent": self.parent,
            "current_at_start": current.version if current else 0,
            "created_by": self.who,
            "created_at": time.time(),
            "figures": figures,
            "prompts": {"train": len(self.train_prompts), "held_out": len(self.held_out),
                        "prompts_file": self.section.prompts_file or None, "served_groups": len(self.served),
                        "served_samples": sum(len(g.responses) for g in self.served),
                        "served_groups_ranked": sum(g.scores is not None for g in self.served),
                        "gate_rankings": len(self.gate_rankings)},
            "model": asdict(self.model_config),
            "ppo": asdict(self.ppo) | {"iterations": self.iterations},
            "kl_controller": {"start": self.kl_state, "end": result.kl_state},
            "gate": asdict(self.gate_config) | {"passed": decision.passed, "why": decision.why},
            "iterations": [s.to_dict() for s in result.iterations],
            "stopped": result.stopped,
            "duration_seconds": time.monotonic() - started,
        }

    def write_artifacts(self, folder: Path, manifest: dict) -> None:
        manifest["format"] = self.policy.save(folder)  # the registry adds every file's checksum

    def record_metrics(self, after: PolicyEvaluation, decision: GateDecision) -> None:
        metrics = self.metrics
        for gauge, figure in ((metrics.gate_reward_gain, "reward_gain"), (metrics.gate_kl_to_ref, "kl_to_ref"),
                              (metrics.gate_perplexity_ratio, "perplexity_ratio"),
                              (metrics.gate_reward_gain_lower_bound, "reward_gain_low"),
                              (metrics.gate_policy_member_gain, "policy_member_gain"),
                              (metrics.gate_users_verdict_lower_bound, "users_verdict_low")):
            if isinstance(decision.figures.get(figure), float):
                gauge.set(decision.figures[figure])


def reward_length(section: PolicyRunConfig, calibrations: dict[str, RewardCalibration], version: int) -> str:
    """The reward's length handling this run uses: the section's, except that a reward-model
    version calibrated before length fits existed can only be scored as learned."""
    if section.reward_length == "neutral" and not all(c.has_length_fit for c in calibrations.values()):
        log.warning("reward model v%d has no length fit in its calibration (trained by an older Flywheel): "
                    "PPO and the gate use its scores with their length dependence", version)
        return "learned"
    return section.reward_length


def _describe_reward(mode: str, calibrations: dict[str, RewardCalibration]) -> str:
    """How the reward treats length, e.g. "length neutral; the members' length slopes policy -0.74,
    judge -0.71 std per ln(tokens)" (each member's raw slope in units of its std)."""
    slopes = ", ".join(f"{member} {c.length_slope / c.std:+.2f}" for member, c in calibrations.items())
    return f"length {mode}; the members' length slopes {slopes} std per ln(tokens)"


def _warm_start(policy: PolicyWithValueHead, registry, current: VersionRecord | None,
                config: PolicyModelConfig) -> tuple[int, int]:
    """Load the current version into the policy when it was trained the same way on the same base;
    returns (the parent version, the version whose weights the policy now has), 0 = the base model."""
    if current is None:
        return 0, 0
    manifest = current.manifest
    if manifest.get("format") != config.finetune or manifest.get("base_model") != config.base_model:
        log.warning("current policy v%d is a %s version of %s; this run trains %s on %s from the base",
                    current.version, manifest.get("format"), manifest.get("base_model"), config.finetune,
                    config.base_model)
        return current.version, 0
    policy.load_version(registry.path(current.version), manifest["format"])
    return current.version, current.version


def _last_kl_state(registry) -> dict | None:
    """Where the adaptive β got to in the last PPO run (promoted or not: that is where it was
    adapted to), so that it keeps adapting across runs instead of restarting each time."""
    for record in sorted(registry.versions(), key=lambda r: r.version, reverse=True):
        state = record.manifest.get("kl_controller", {}).get("end")
        if state:
            return state
    return None


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
        metrics.progress.set(iteration / total if total else 1.0)
        metrics.episodes_per_second.set(iteration * batch_size / max(time.monotonic() - started, 1e-9))
        metrics.eta.set(eta)
        metrics.episodes.inc(stats.episodes)
        metrics.iterations.inc()
    return report
