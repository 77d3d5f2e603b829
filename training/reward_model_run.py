"""One incremental reward-model run, end to end.

1. Take the run lock (one reward-model run at a time; a dead worker's lock expires).
2. Claim the ranking entries left pending by dead runs and read new ones (``reward-model`` group).
3. Copy them into the replay store (fsynced) so they outlive their groups' TTL.
4. Split by the held-out hash; add a replay sample of older training rankings to the new ones.
5. Warm-start from the current version, evaluate it on the held-out rankings, train, evaluate again.
6. Write the new version (temp folder + rename) with its manifest, then promote it or mark it
   rejected: it must not be worse than the current version's held-out accuracy by more than
   ``reward_model_accuracy_margin``.
7. Only now acknowledge the stream entries. A run killed before this leaves them pending, so the
   next run reads them again (and a version never exists half-written).
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import redis as redis_lib
import torch

from flywheel.contracts.artifacts import REWARD_MODEL_KIND, REWARD_MODEL_WEIGHTS_FILE, registry_folder, verify_version
from flywheel.contracts.heldout import is_held_out
from flywheel.contracts.keys import REWARD_MODEL_RUN_LOCK_KEY
from flywheel.models import resolve_compute_dtype, resolve_model_path
from flywheel.rankings_stream import RankingStreamReader
from flywheel.registry import VersionRecord, VersionRegistry, open_registry
from flywheel.run_lock import RunLock, run_exclusively
from flywheel.settings import Settings
from training.metrics import RewardModelMetrics
from training.rankings import ReplayStore, ranking_from_entry, sample_replay
from training.reward_model import RewardModel, RewardModelConfig
from training.reward_trainer import EvalStats, RewardModelTrainer, RewardTrainingConfig

log = logging.getLogger(__name__)

REPLAY_FILE = "rankings.jsonl"  # in the reward-model registry's folder


@dataclass
class RunReport:
    outcome: str
    """promoted | rejected | skipped"""
    reason: str
    version: int = 0
    figures: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def replay_store(settings: Settings) -> ReplayStore:
    return ReplayStore(registry_folder(settings.data_dir, REWARD_MODEL_KIND) / REPLAY_FILE)


def model_config_from_settings(settings: Settings) -> RewardModelConfig:
    backbone = resolve_model_path(settings.reward_model_backbone or settings.model, Path(settings.data_dir))
    return RewardModelConfig(backbone=str(backbone), trainable_layers=settings.reward_model_trainable_layers,
                             max_length=settings.reward_model_max_length,
                             autocast_dtype=resolve_compute_dtype(settings.reward_model_autocast))


def training_config_from_settings(settings: Settings) -> RewardTrainingConfig:
    return RewardTrainingConfig(learning_rate=settings.reward_model_learning_rate,
                                batch_rankings=settings.reward_model_batch_rankings,
                                epochs=settings.reward_model_epochs, ai_weight=settings.reward_model_ai_weight)


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


def run_reward_model_training(settings: Settings, client: redis_lib.Redis, *, min_rankings: int = 1,
                              who: str = "", metrics: RewardModelMetrics | None = None,
                              cache: RewardModelCache | None = None, consumer: str | None = None) -> RunReport:
    """Run once if at least ``min_rankings`` rankings wait in the stream; see the module docstring."""
    who = who or f"{socket.gethostname()}:{os.getpid()}"
    lock = RunLock(client, REWARD_MODEL_RUN_LOCK_KEY, settings.reward_model_lock_seconds)
    return run_exclusively(lock, metrics, "reward-model",
                           RunReport("skipped", "another reward-model run holds the lock"),
                           lambda started: _run_locked(settings, client, min_rankings, who, metrics,
                                                       cache or RewardModelCache(), consumer, started))


def _run_locked(settings: Settings, client: redis_lib.Redis, min_rankings: int, who: str,
                metrics: RewardModelMetrics | None, cache: RewardModelCache, consumer: str | None,
                started: float) -> RunReport:
    reader = RankingStreamReader(client, consumer=consumer)
    waiting = reader.waiting(max(min_rankings, 1))
    if waiting < max(min_rankings, 1):
        return RunReport("skipped", f"{waiting} rankings waiting, fewer than {min_rankings}")
    batch = reader.read(settings.reward_model_max_rankings, ranking_from_entry)
    store = replay_store(settings)
    stored_before = store.load()
    known = {r.ranking_id for r in stored_before}
    store.append([r for r in batch.rankings if r.ranking_id not in known])  # durable before any ack

    fraction = settings.reward_model_heldout_fraction
    new_ids = {r.ranking_id for r in batch.rankings}
    new_train = [r for r in batch.rankings if not is_held_out(r.group_id, fraction)]
    older_train = [r for r in stored_before if not is_held_out(r.group_id, fraction)]
    replay = sample_replay(older_train, new_ids, round(settings.reward_model_replay_ratio * len(new_train)),
                           random.Random(int(time.time())))
    held_out = [r for r in stored_before if is_held_out(r.group_id, fraction) and r.ranking_id not in new_ids]
    held_out = (held_out + [r for r in batch.rankings if is_held_out(r.group_id, fraction)])
    held_out = held_out[-settings.reward_model_max_heldout:]
    if not new_train:
        reader.acknowledge(batch.entry_ids)
        return RunReport("skipped", f"no new training rankings ({len(batch.entry_ids)} entries: held-out or unusable;"
                                    " stored and acknowledged)")

    registry = open_registry(client, settings.data_dir, REWARD_MODEL_KIND)
    current = registry.current()
    model_config = model_config_from_settings(settings)
    parent, parent_keys = _parent(registry, current, model_config)
    model, tokenizer = cache.model_for(model_config, parent_keys)
    if parent is not None:
        model.load_stored(registry.path(parent.version) / REWARD_MODEL_WEIGHTS_FILE)
    trainer = RewardModelTrainer(model, tokenizer, training_config_from_settings(settings))
    log.info("reward-model run: %d new + %d replayed training rankings, %d held out, warm start from %s, "
             "%.1f M trainable parameters", len(new_train), len(replay), len(held_out),
             f"v{parent.version}" if parent else "the backbone", model.trainable_parameter_count() / 1e6)

    before = trainer.evaluate(held_out) if current is not None else None
    stats = trainer.train(new_train + replay, progress=_progress_reporter(metrics))
    after = trainer.evaluate(held_out)

    margin = settings.reward_model_accuracy_margin
    if current is None:
        promote, why = True, "first reward model"
    elif before is None or before.accuracy is None or after.accuracy is None:
        promote, why = True, "no held-out rankings to compare on yet"
    elif after.accuracy >= before.accuracy - margin:
        promote, why = True, (f"held-out accuracy {after.accuracy:.4f} vs current v{current.version} "
                              f"{before.accuracy:.4f} (margin {margin})")
    else:
        promote, why = False, (f"held-out accuracy {after.accuracy:.4f} is worse than current v{current.version} "
                               f"{before.accuracy:.4f} by more than {margin}")

    used = new_train + replay
    figures = _figures("heldout_", after) | {f"current_{k}": v for k, v in _figures("heldout_", before).items()} | {
        "training_loss": stats.loss, "training_pairs_per_second": stats.pairs_per_second,
        "training_seconds": stats.seconds, "training_steps": stats.steps,
    }
    manifest = {
        "parent": parent.version if parent else None,
        "current_at_start": current.version if current else None,
        "created_by": who,
        "created_at": time.time(),
        "figures": figures,
        "rankings": {
            "count": len(used), "new": len(new_train), "replayed": len(replay), "held_out": len(held_out),
            "new_held_out": sum(is_held_out(r.group_id, fraction) for r in batch.rankings),
            "human": sum(r.source != "ai" for r in used), "ai": sum(r.source == "ai" for r in used),
            "stream": {"key": reader.stream, "group": reader.group, "first_id": batch.first_id,
                       "last_id": batch.last_id, "entries": len(batch.entry_ids), "unusable": len(batch.skipped)},
        },
        "model": asdict(model_config) | {"stored": "trained parameters only (float32); the rest is the backbone"},
        "training": asdict(trainer.config),
        "gate": {"promoted": promote, "why": why, "margin": margin},
        "duration_seconds": time.monotonic() - started,
    }
    stored_keys = set(parent_keys)
    record = registry.write_version(lambda folder: model.save(folder, stored_keys), manifest)
    if promote:
        registry.promote(record.version, who, why)
    else:
        registry.reject(record.version, who, why)
    reader.acknowledge(batch.entry_ids)  # only now: the version is on disk

    if metrics is not None:
        metrics.training_loss.set(stats.loss)
        if after.accuracy is not None:
            metrics.heldout_accuracy.set(after.accuracy)
            metrics.heldout_loss.set(after.loss)
        for split, rankings in (("new", new_train), ("replay", replay)):
            for source in ("human", "ai"):
                count = sum((r.source == "ai") == (source == "ai") for r in rankings)
                if count:
                    metrics.rankings_used.labels(split, source).inc(count)
        metrics.run_rankings.set(len(used))
        metrics.pairs_per_second.set(stats.pairs_per_second)
        metrics.current_version.set(registry.current_version())
    return RunReport("promoted" if promote else "rejected", why, record.version, figures)


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
