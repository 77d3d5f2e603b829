"""One incremental reward-model run, end to end.

1. Take the run lock (one reward-model run at a time; a dead worker's lock expires).
2. Claim the ranking entries left pending by dead runs and read new ones (``reward-model`` group).
3. Copy them into the replay store (fsynced) so they outlive their groups' TTL.
4. Split by the held-out hash; add a replay sample of older training rankings to the new ones;
   split the training rankings between the two members by a hash of the group id
   (``flywheel.contracts.heldout.reward_model_member``): ``policy`` (the reward PPO optimises)
   and ``judge`` (the independent signal the policy gate measures with).
5. Warm-start each member from the current version's, evaluate it on rankings it never trains on
   (the held-out groups and the other member's half), train, evaluate again, and calibrate it:
   mean 0, std 1 over the completions of the run's rankings (served completions), scored as PPO
   scores its responses. The pairwise loss sees only score differences, so without this a
   version's offset would be whatever its random head started at.
6. Write the new version (temp folder + rename) with its manifest, then promote it or mark it
   rejected (``training.reward_model_gate``): each member's accuracy must be above chance with 95%
   confidence and not worse than the current version's by more than ``reward_model_accuracy_margin``.
7. Only now acknowledge the stream entries. A run killed before this leaves them pending, so the
   next run reads them again (and a version never exists half-written).

Steps 1, 5 and 6 are the skeleton every run shares (``training.run.TrainingRun``); ``RewardModelRun``
fills in the rest.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict
from pathlib import Path

import redis as redis_lib
import torch

from flywheel.config import FlywheelConfig, RewardModelRunConfig
from flywheel.contracts.artifacts import (REWARD_MODEL_KIND, REWARD_MODEL_MEMBER_FILES, REWARD_MODEL_MEMBERS,
                                          registry_folder, verify_version)
from flywheel.contracts.heldout import is_held_out, reward_model_member
from flywheel.contracts.keys import REWARD_MODEL_RUN_LOCK_KEY
from flywheel.models import resolve_compute_dtype, resolve_device, resolve_model_path
from flywheel.rankings_stream import RankingStream, RankingStreamReader
from flywheel.registry import VersionRecord, VersionRegistry, open_registry
from flywheel.run_ledger import RunAttempt
from training.ai_weight import AIWeight, ai_ranking_weight
from training.metrics import RewardModelMetrics
from training.rankings import ReplayStore, ranking_from_entry, sample_replay
from training.policy_reward import calibrate
from training.rankings import Ranking
from training.reward_model import RewardCalibration, RewardModel, RewardModelConfig
from training.reward_model_gate import RewardModelGateDecision, reward_model_gate_decision
from training.reward_trainer import EvalStats, RewardModelTrainer, RewardTrainingConfig
from training.run import RunReport, TrainingRun, json_safe_figures

log = logging.getLogger(__name__)

REPLAY_FILE = "rankings.jsonl"  # in the reward-model registry's folder


def replay_store(config: FlywheelConfig) -> ReplayStore:
    return ReplayStore(registry_folder(config.data_dir, REWARD_MODEL_KIND) / REPLAY_FILE)


def reward_model_config(config: FlywheelConfig) -> RewardModelConfig:
    """The model a run trains: the configured backbone (else the served model) with its section's shape."""
    section = config.reward_model
    backbone = resolve_model_path(section.backbone or config.model, Path(config.data_dir))
    autocast = resolve_compute_dtype(section.autocast, resolve_device(config.device))
    return RewardModelConfig(backbone=str(backbone), trainable_layers=section.trainable_layers,
                             max_length=section.max_length, autocast_dtype=autocast,
                             pooling=section.pooling)


def reward_training_config(section: RewardModelRunConfig, ai_weight: AIWeight | None = None) -> RewardTrainingConfig:
    """How a run trains; an AI ranking weighs ``ai_weight.weight`` (the agreement rule,
    ``training.ai_weight``), or the section's ai_weight where none is given."""
    return RewardTrainingConfig(learning_rate=section.learning_rate, batch_rankings=section.batch_rankings,
                                epochs=section.epochs, linear_probe=section.linear_probe,
                                ai_weight=section.ai_weight if ai_weight is None else ai_weight.weight)


def measured_ai_weight(client: redis_lib.Redis, section: RewardModelRunConfig) -> AIWeight:
    """The weight of AI rankings in this run, from the AI-human agreement the rankings stream has counted."""
    stats = RankingStream(client).stats()
    return ai_ranking_weight(stats.agreement.agreed_pairs, stats.agreement.pairs, stats.agreement_groups,
                             max_weight=section.ai_weight, min_groups=section.ai_min_overlap_groups)


class RewardModelCache:
    """Keeps each member's model loaded in a worker between runs. Each run resets the trainable
    parameters to the backbone's (and a fresh head) and then loads the parent version over them."""

    def __init__(self) -> None:
        self._members: dict[str, _MemberCache] = {}

    def model_for(self, config: RewardModelConfig, parent_keys: set[str], member: str = REWARD_MODEL_MEMBERS[0],
                  device: torch.device | str = "cpu") -> tuple[RewardModel, object]:
        return self._members.setdefault(member, _MemberCache()).model_for(config, parent_keys, torch.device(device))


class _MemberCache:
    def __init__(self) -> None:
        self._key = None
        self._model: RewardModel | None = None
        self._tokenizer = None
        self._initial: dict[str, torch.Tensor] = {}

    def model_for(self, config: RewardModelConfig, parent_keys: set[str],
                  device: torch.device) -> tuple[RewardModel, object]:
        key = (config.backbone, config.trainable_layers, config.max_length, config.autocast_dtype, config.pooling,
               device)
        if self._key != key or not parent_keys <= set(self._initial):
            from transformers import AutoTokenizer

            torch.manual_seed(0)
            self._model = RewardModel.from_backbone(config, device)
            self._tokenizer = AutoTokenizer.from_pretrained(config.backbone)
            self._initial = self._model.stored_state_dict(parent_keys)
            self._key = key
        else:
            self._model.load_state_dict(self._initial, strict=False)
            self._model.set_trainable(config.trainable_layers)
        return self._model, self._tokenizer


def _figures(prefix: str, stats: EvalStats | None) -> dict:
    if stats is None:
        return {}
    return {f"{prefix}accuracy": stats.accuracy, f"{prefix}loss": stats.loss, f"{prefix}pairs": stats.pairs,
            f"{prefix}human_accuracy": stats.human_accuracy}


def run_reward_model_training(config: FlywheelConfig, client: redis_lib.Redis, *, min_rankings: int = 1,
                              who: str = "", metrics: RewardModelMetrics | None = None,
                              cache: RewardModelCache | None = None, consumer: str | None = None,
                              attempt: RunAttempt | None = None) -> RunReport:
    """Run once if at least ``min_rankings`` rankings wait in the stream; see the module docstring."""
    return RewardModelRun(config, client, min_rankings=min_rankings, who=who, metrics=metrics,
                          cache=cache or RewardModelCache(), consumer=consumer, attempt=attempt).run()


class RewardModelRun(TrainingRun):
    """The steps of one reward-model run (``TrainingRun`` orders them)."""

    name = "reward-model"
    lock_key = REWARD_MODEL_RUN_LOCK_KEY

    def __init__(self, config: FlywheelConfig, client: redis_lib.Redis, *, min_rankings: int, who: str,
                 metrics: RewardModelMetrics | None, cache: RewardModelCache, consumer: str | None,
                 attempt: RunAttempt | None = None) -> None:
        super().__init__(client, open_registry(client, config.data_dir, REWARD_MODEL_KIND),
                         lock_seconds=config.reward_model.lock_seconds, who=who, metrics=metrics, attempt=attempt)
        self.config = config
        self.section = config.reward_model
        self.min_rankings = min_rankings
        self.cache = cache
        self.consumer = consumer

    def prepare(self) -> str | None:
        self.reader = reader = RankingStreamReader(self.client, consumer=self.consumer)
        waiting = reader.waiting(max(self.min_rankings, 1))
        if waiting < max(self.min_rankings, 1):
            return f"{waiting} rankings waiting, fewer than {self.min_rankings}"
        self.batch = batch = reader.read(self.section.max_rankings, ranking_from_entry)
        self.ai_weight = measured_ai_weight(self.client, self.section)
        store = replay_store(self.config)
        stored_before = store.load()
        known = {r.ranking_id for r in stored_before}
        store.append([r for r in batch.rankings if r.ranking_id not in known])  # durable before any ack

        fraction = self.section.heldout_fraction
        new_ids = {r.ranking_id for r in batch.rankings}
        self.new_train = [r for r in batch.rankings if not is_held_out(r.group_id, fraction)]
        older_train = [r for r in stored_before if not is_held_out(r.group_id, fraction)]
        self.replay = sample_replay(older_train, new_ids, round(self.section.replay_ratio * len(self.new_train)),
                                    random.Random(int(time.time())))
        held_out = [r for r in stored_before if is_held_out(r.group_id, fraction) and r.ranking_id not in new_ids]
        held_out = (held_out + [r for r in batch.rankings if is_held_out(r.group_id, fraction)])
        self.held_out = held_out[-self.section.max_heldout:]
        if not self.new_train:
            reader.acknowledge(batch.entry_ids)
            return (f"no new training rankings ({len(batch.entry_ids)} entries: held-out or unusable;"
                    " stored and acknowledged)")
        # each member trains on its half and is evaluated on what it never trains on: the held-out
        # groups and the other member's half (every stored ranking of it, newest first)
        every_train = older_train + [r for r in self.new_train if r.ranking_id not in known]
        self.train_sets = {m: [r for r in self.new_train + self.replay if reward_model_member(r.group_id) == m]
                           for m in REWARD_MODEL_MEMBERS}
        self.eval_sets = {m: (self.held_out + [r for r in every_train if reward_model_member(r.group_id) != m]
                              )[-self.section.max_heldout:] for m in REWARD_MODEL_MEMBERS}
        return None

    def set_up(self, current: VersionRecord | None) -> None:
        self.model_config = reward_model_config(self.config)
        self.parent, self.parent_keys = _parent(self.registry, current, self.model_config)
        self.trainers: dict[str, RewardModelTrainer] = {}
        for member in REWARD_MODEL_MEMBERS:
            keys = self.parent_keys.get(member, set())
            model, tokenizer = self.cache.model_for(self.model_config, keys, member, resolve_device(self.config.device))
            if keys:
                model.load_stored(self.registry.path(self.parent.version) / REWARD_MODEL_MEMBER_FILES[member])
            self.trainers[member] = RewardModelTrainer(model, tokenizer,
                                                       reward_training_config(self.section, self.ai_weight))
        self.tokenizer = tokenizer
        log.info("reward-model run: %d new + %d replayed training rankings (%s), %d held out, warm start from %s, "
                 "%.1f M trainable parameters per member; AI rankings weigh %.3f (%s)", len(self.new_train),
                 len(self.replay),
                 ", ".join(f"{m} {len(self.train_sets[m])}" for m in REWARD_MODEL_MEMBERS), len(self.held_out),
                 f"v{self.parent.version}" if self.parent else "the backbone",
                 self.trainers[REWARD_MODEL_MEMBERS[0]].model.trainable_parameter_count() / 1e6,
                 self.ai_weight.weight, self.ai_weight.why)

    def evaluate(self) -> dict[str, EvalStats]:
        return {m: self.trainers[m].evaluate(self.eval_sets[m]) for m in REWARD_MODEL_MEMBERS}

    def train(self) -> None:
        self.stats, self.calibrations = {}, {}
        for index, member in enumerate(REWARD_MODEL_MEMBERS):
            trainer = self.trainers[member]
            self.stats[member] = trainer.train(self.train_sets[member],
                                               progress=_progress_reporter(self.metrics, index, len(REWARD_MODEL_MEMBERS)))
            self.calibrations[member] = _calibration(trainer.model, self.tokenizer,
                                                     self.new_train + self.replay + self.held_out)

    def gate(self, current: VersionRecord | None, before: dict[str, EvalStats] | None,
             after: dict[str, EvalStats]) -> RewardModelGateDecision:
        return reward_model_gate_decision(after, before, current.version if current else None,
                                          self.section.accuracy_margin, self.section.min_accuracy)

    def manifest(self, current: VersionRecord | None, before: dict[str, EvalStats] | None,
                 after: dict[str, EvalStats], decision: RewardModelGateDecision, started: float) -> dict:
        used = self.new_train + self.replay
        batch, reader, fraction = self.batch, self.reader, self.section.heldout_fraction
        first = REWARD_MODEL_MEMBERS[0]
        figures = _figures("heldout_", after[first]) | {
            f"current_{k}": v for k, v in _figures("heldout_", (before or {}).get(first)).items()} | {
            "training_loss": sum(s.loss * s.rankings for s in self.stats.values() if s.rankings) / max(
                sum(s.rankings for s in self.stats.values()), 1),
            "training_pairs_per_second": sum(s.pairs for s in self.stats.values()) / max(
                sum(s.seconds for s in self.stats.values()), 1e-9),
            "training_seconds": sum(s.seconds for s in self.stats.values()),
            "training_steps": sum(s.steps for s in self.stats.values()),
            "ai_weight": self.ai_weight.weight,
        } | {f"{m}_heldout_accuracy": after[m].accuracy for m in REWARD_MODEL_MEMBERS} | decision.figures
        members = {m: {"file": REWARD_MODEL_MEMBER_FILES[m], "calibration": self.calibrations[m].to_dict(),
                       "trained_on": len(self.train_sets[m]), "evaluated_on": len(self.eval_sets[m]),
                       "heldout": after[m].accuracy_interval().to_dict() | {"judged_on": after[m].judged_on},
                       "probe": self.stats[m].probe.to_dict() if self.stats[m].probe else None}
                   for m in REWARD_MODEL_MEMBERS}
        return {
            "parent": self.parent.version if self.parent else None,
            "current_at_start": current.version if current else None,
            "created_by": self.who,
            "created_at": time.time(),
            "figures": json_safe_figures(figures),
            "members": members,
            "rankings": {
                "count": len(used), "new": len(self.new_train), "replayed": len(self.replay),
                "held_out": len(self.held_out),
                "new_held_out": sum(is_held_out(r.group_id, fraction) for r in batch.rankings),
                "human": sum(r.source != "ai" for r in used), "ai": sum(r.source == "ai" for r in used),
                "stream": {"key": reader.stream, "group": reader.group, "first_id": batch.first_id,
                           "last_id": batch.last_id, "entries": len(batch.entry_ids), "unusable": len(batch.skipped)},
            },
            "model": asdict(self.model_config) | {
                "stored": "trained parameters only (float32); the rest is the backbone"},
            "training": asdict(self.trainers[first].config),
            "ai_weight": json_safe_figures(self.ai_weight.to_dict()),
            "gate": {"promoted": decision.passed, "why": decision.why, "margin": self.section.accuracy_margin,
                     "min_accuracy": self.section.min_accuracy},
            "duration_seconds": time.monotonic() - started,
        }

    def write_artifacts(self, folder: Path, manifest: dict) -> None:
        for member in REWARD_MODEL_MEMBERS:
            self.trainers[member].model.save(folder, set(self.parent_keys.get(member, set())),
                                             REWARD_MODEL_MEMBER_FILES[member])

    def written(self, record: VersionRecord) -> None:
        self.reader.acknowledge(self.batch.entry_ids)  # only now: the version is on disk

    def record_metrics(self, after: dict[str, EvalStats], decision: RewardModelGateDecision) -> None:
        metrics, first = self.metrics, REWARD_MODEL_MEMBERS[0]
        metrics.training_loss.set(self.stats[first].loss)
        if after[first].accuracy is not None:
            metrics.heldout_accuracy.set(after[first].accuracy)
            metrics.heldout_loss.set(after[first].loss)
        for split, rankings in (("new", self.new_train), ("replay", self.replay)):
            for source in ("human", "ai"):
                count = sum((r.source == "ai") == (source == "ai") for r in rankings)
                if count:
                    metrics.rankings_used.labels(split, source).inc(count)
        metrics.run_rankings.set(len(self.new_train + self.replay))
        metrics.ai_weight.set(self.ai_weight.weight)
        metrics.ai_agreement_groups.set(self.ai_weight.overlap_groups)
        if self.ai_weight.agreement is not None:
            metrics.ai_agreement.set(self.ai_weight.agreement)
        metrics.pairs_per_second.set(self.stats[first].pairs_per_second)


CALIBRATION_COMPLETIONS = 256  # served completions a member is calibrated on (at most): the std to ~4%


def _calibration(model: RewardModel, tokenizer, rankings: list[Ranking]) -> RewardCalibration:
    """Mean and std of a member's raw scores over the completions of the run's rankings (what the
    policy serves), tokenized and scored as PPO's responses are (prompt ids + response ids + EOS)."""
    rng = random.Random(0)
    pairs = [(r.prompt, c) for r in rankings for c in r.completions]
    pairs = rng.sample(pairs, min(len(pairs), CALIBRATION_COMPLETIONS))
    prompt_ids = [tokenizer(p, add_special_tokens=False).input_ids for p, _ in pairs]
    response_ids = [tokenizer(c, add_special_tokens=False).input_ids for _, c in pairs]
    return calibrate(model, prompt_ids, response_ids, eos_id=tokenizer.eos_token_id,
                     pad_id=tokenizer.pad_token_id or 0)


def _progress_reporter(metrics: RewardModelMetrics | None, member_index: int = 0, members: int = 1):
    """Sets the run's progress and ETA gauges after every optimizer step (None without metrics);
    the members train one after the other, each a share of the run."""
    if metrics is None:
        return None
    started = time.monotonic()

    def report(step: int, total_steps: int, loss: float) -> None:
        done = step / total_steps if total_steps else 1.0
        metrics.progress.set((member_index + done) / members)
        per_member = (time.monotonic() - started) / done if done else 0.0
        metrics.eta.set(per_member * (members - member_index - done))

    return report


def _parent(registry: VersionRegistry, current: VersionRecord | None,
            config: RewardModelConfig) -> tuple[VersionRecord | None, dict[str, set[str]]]:
    """The version to warm-start from (the current one, if built on the same backbone) and, per
    member it has, the parameter names it stored (a child stores at least those, so it is complete
    on its own). A member the parent lacks starts from the backbone."""
    if current is None:
        return None, {}
    if current.manifest.get("model", {}).get("backbone") != config.backbone:
        log.warning("current reward model v%d has another backbone; training from the backbone", current.version)
        return None, {}
    if current.manifest.get("model", {}).get("pooling", "last") != config.pooling:
        log.warning("current reward model v%d has another head (pooling %s); training from the backbone",
                    current.version, current.manifest.get("model", {}).get("pooling", "last"))
        return None, {}
    from safetensors import safe_open

    folder = registry.path(current.version)
    verify_version(folder)  # never warm-start from a corrupt artifact
    keys = {}
    for member, file_name in REWARD_MODEL_MEMBER_FILES.items():
        if (folder / file_name).is_file():
            with safe_open(str(folder / file_name), "pt") as handle:
                keys[member] = set(handle.keys())
    return current, keys
