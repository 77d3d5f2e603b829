"""One incremental reward-model run, end to end.

1. Take the run lock (one reward-model run at a time; a dead worker's lock expires).
2. Claim the ranking entries left pending by dead runs and read new ones (``reward-model`` group).
3. Copy them into the replay store (fsynced) so they outlive their groups' TTL.
4. Split by the held-out hash; add a replay sample of older training rankings to the new ones.
5. Warm-start from the current version, evaluate it on the held-out rankings, train, evaluate again.
6. Write the new version (temp folder + rename) with its manifest, then promote it or mark it
   rejected: it must not be worse than the current version's held-out accuracy by more than
   ``reward_model_accuracy_margin`` (``training.reward_model_gate``).
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
from flywheel.contracts.artifacts import REWARD_MODEL_KIND, REWARD_MODEL_WEIGHTS_FILE, registry_folder, verify_version
from flywheel.contracts.heldout import is_held_out
from flywheel.contracts.keys import REWARD_MODEL_RUN_LOCK_KEY
from flywheel.models import resolve_compute_dtype, resolve_model_path
from flywheel.rankings_stream import RankingStreamReader
from flywheel.registry import VersionRecord, VersionRegistry, open_registry
from training.metrics import RewardModelMetrics
from training.rankings import ReplayStore, ranking_from_entry, sample_replay
from training.reward_model import RewardModel, RewardModelConfig
from training.reward_model_gate import RewardModelGateDecision, reward_model_gate_decision
from training.reward_trainer import EvalStats, RewardModelTrainer, RewardTrainingConfig
from training.run import RunReport, TrainingRun

log = logging.getLogger(__name__)

REPLAY_FILE = "rankings.jsonl"  # in the reward-model registry's folder


def replay_store(config: FlywheelConfig) -> ReplayStore:
    return ReplayStore(registry_folder(config.data_dir, REWARD_MODEL_KIND) / REPLAY_FILE)


def reward_model_config(config: FlywheelConfig) -> RewardModelConfig:
    """The model a run trains: the configured backbone (else the served model) with its section's shape."""
    section = config.reward_model
    backbone = resolve_model_path(section.backbone or config.model, Path(config.data_dir))
    return RewardModelConfig(backbone=str(backbone), trainable_layers=section.trainable_layers,
                             max_length=section.max_length, autocast_dtype=resolve_compute_dtype(section.autocast))


def reward_training_config(section: RewardModelRunConfig) -> RewardTrainingConfig:
    return RewardTrainingConfig(learning_rate=section.learning_rate, batch_rankings=section.batch_rankings,
                                epochs=section.epochs, ai_weight=section.ai_weight)


class RewardModelCache:
    """Keeps the backbone loaded in a worker between runs. Each run resets the trainable
    parameters to the backbone's (and a fresh head) and then loads the parent version over them."""

    def __init__(self) -> None:
        self._key = None
        self._model: RewardModel | None = None
        self._tokenizer = None
        self._initial: dict[str, torch.Tensor] = {}

    def model_for(self, config: RewardModelConfig, parent_keys: set[str]) -> tuple[RewardModel, object]:
        key = (config.backbone, config.trainable_layers, config.max_length, config.autocast_dtype)
        if self._key != key or not parent_keys <= set(self._initial):
            from transformers import AutoTokenizer

            torch.manual_seed(0)
            self._model = RewardModel.from_backbone(config)
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
                              cache: RewardModelCache | None = None, consumer: str | None = None) -> RunReport:
    """Run once if at least ``min_rankings`` rankings wait in the stream; see the module docstring."""
    return RewardModelRun(config, client, min_rankings=min_rankings, who=who, metrics=metrics,
                          cache=cache or RewardModelCache(), consumer=consumer).run()


class RewardModelRun(TrainingRun):
    """The steps of one reward-model run (``TrainingRun`` orders them)."""

    name = "reward-model"
    lock_key = REWARD_MODEL_RUN_LOCK_KEY

    def __init__(self, config: FlywheelConfig, client: redis_lib.Redis, *, min_rankings: int, who: str,
                 metrics: RewardModelMetrics | None, cache: RewardModelCache, consumer: str | None) -> None:
        super().__init__(client, open_registry(client, config.data_dir, REWARD_MODEL_KIND),
                         lock_seconds=config.reward_model.lock_seconds, who=who, metrics=metrics)
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
        return None

    def set_up(self, current: VersionRecord | None) -> None:
        self.model_config = reward_model_config(self.config)
        self.parent, self.parent_keys = _parent(self.registry, current, self.model_config)
        self.model, tokenizer = self.cache.model_for(self.model_config, self.parent_keys)
        if self.parent is not None:
            self.model.load_stored(self.registry.path(self.parent.version) / REWARD_MODEL_WEIGHTS_FILE)
        self.trainer = RewardModelTrainer(self.model, tokenizer, reward_training_config(self.section))
        log.info("reward-model run: %d new + %d replayed training rankings, %d held out, warm start from %s, "
                 "%.1f M trainable parameters", len(self.new_train), len(self.replay), len(self.held_out),
                 f"v{self.parent.version}" if self.parent else "the backbone",
                 self.model.trainable_parameter_count() / 1e6)

    def evaluate(self) -> EvalStats:
        return self.trainer.evaluate(self.held_out)

    def train(self) -> None:
        self.stats = self.trainer.train(self.new_train + self.replay, progress=_progress_reporter(self.metrics))

    def gate(self, current: VersionRecord | None, before: EvalStats | None,
             after: EvalStats) -> RewardModelGateDecision:
        return reward_model_gate_decision(after, before, current.version if current else None,
                                          self.section.accuracy_margin)

    def manifest(self, current: VersionRecord | None, before: EvalStats | None, after: EvalStats,
                 decision: RewardModelGateDecision, started: float) -> dict:
        used = self.new_train + self.replay
        stats, batch, reader, fraction = self.stats, self.batch, self.reader, self.section.heldout_fraction
        figures = _figures("heldout_", after) | {f"current_{k}": v for k, v in _figures("heldout_", before).items()} | {
            "training_loss": stats.loss, "training_pairs_per_second": stats.pairs_per_second,
            "training_seconds": stats.seconds, "training_steps": stats.steps,
        }
        return {
            "parent": self.parent.version if self.parent else None,
            "current_at_start": current.version if current else None,
            "created_by": self.who,
            "created_at": time.time(),
            "figures": figures,
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
            "training": asdict(self.trainer.config),
            "gate": {"promoted": decision.passed, "why": decision.why, "margin": self.section.accuracy_margin},
            "duration_seconds": time.monotonic() - started,
        }

    def write_artifacts(self, folder: Path, manifest: dict) -> None:
        self.model.save(folder, set(self.parent_keys))

    def written(self, record: VersionRecord) -> None:
        self.reader.acknowledge(self.batch.entry_ids)  # only now: the version is on disk

    def record_metrics(self, after: EvalStats, decision: RewardModelGateDecision) -> None:
        metrics, stats = self.metrics, self.stats
        metrics.training_loss.set(stats.loss)
        if after.accuracy is not None:
            metrics.heldout_accuracy.set(after.accuracy)
            metrics.heldout_loss.set(after.loss)
        for split, rankings in (("new", self.new_train), ("replay", self.replay)):
            for source in ("human", "ai"):
                count = sum((r.source == "ai") == (source == "ai") for r in rankings)
                if count:
                    metrics.rankings_used.labels(split, source).inc(count)
        metrics.run_rankings.set(len(self.new_train + self.replay))
        metrics.pairs_per_second.set(stats.pairs_per_second)


def _progress_reporter(metrics: RewardModelMetrics | None):
    """Sets the run's progress and ETA gauges after every optimizer step (None without metrics)."""
    if metrics is None:
        return None
    started = time.monotonic()

    def report(step: int, total_steps: int, loss: float) -> None:
        metrics.progress.set(step / total_steps if total_steps else 1.0)
        metrics.eta.set((total_steps - step) * (time.monotonic() - started) / step if step else 0.0)

    return report


def _parent(registry: VersionRegistry, current: VersionRecord | None,
            config: RewardModelConfig) -> tuple[VersionRecord | None, set[str]]:
    """The version to warm-start from (the current one, if built on the same backbone) and the
    parameter names it stored (a child stores at least those, so it is complete on its own)."""
    if current is None:
        return None, set()
    if current.manifest.get("model", {}).get("backbone") != config.backbone:
        log.warning("current reward model v%d has another backbone; training from the backbone", current.version)
        return None, set()
    from safetensors import safe_open

    verify_version(registry.path(current.version))  # never warm-start from a corrupt artifact
    with safe_open(str(registry.path(current.version) / REWARD_MODEL_WEIGHTS_FILE), "pt") as handle:
        return current, set(handle.keys())
