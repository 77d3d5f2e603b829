"""Celery tasks of the training queue, and what a training worker runs beside them.

- ``training.train_reward_model``: one incremental reward-model run (skips when another holds the
  lock or fewer than ``min_rankings`` rankings wait).
- A watcher thread in each worker checks the rankings stream every ``reward_model_check_seconds``
  and enqueues ``training.train_reward_model`` once ``reward_model_trigger_rankings`` new rankings
  have arrived (a short-lived Redis key keeps several workers from enqueueing it twice).
- ``training.train_policy``: one PPO run (skips when another holds the lock or there is no reward
  model yet); enqueued after every promoted reward model (``policy_train_after_reward_model``) and
  by ``flywheel train policy``.
- ``/metrics`` on ``training_metrics_port``.

The models stay loaded in the worker process between runs (``RewardModelCache``, ``PolicyModelCache``).
"""

from __future__ import annotations

import logging
import socket
import threading

import redis as redis_lib
from celery import signals
from prometheus_client import start_http_server

from flywheel.celery_app import TRAINING_QUEUE, app, worker_consumes
from flywheel.metrics_registry import process_registry
from flywheel.contracts.artifacts import POLICY_KIND, REWARD_MODEL_KIND
from flywheel.contracts.keys import REWARD_MODEL_RUN_LOCK_KEY, REWARD_MODEL_TRIGGER_KEY
from flywheel.rankings_stream import RankingStreamReader
from flywheel.redis_server import open_redis
from flywheel.registry import open_registry
from flywheel.config import FlywheelConfig
from training.metrics import PPOMetrics, RewardModelMetrics
from training.policy_run import PolicyModelCache, run_policy_training
from training.reward_model_run import RewardModelCache, run_reward_model_training

log = logging.getLogger(__name__)

TRAIN_REWARD_MODEL = "training.train_reward_model"
TRAIN_POLICY = "training.train_policy"

METRICS_REGISTRY = process_registry()
REWARD_MODEL_METRICS = RewardModelMetrics(METRICS_REGISTRY)
PPO_METRICS = PPOMetrics(METRICS_REGISTRY)
_CACHE = RewardModelCache()
_POLICY_CACHE = PolicyModelCache()
_WATCHER_STOP = threading.Event()


def redis_client(settings: FlywheelConfig) -> redis_lib.Redis:
    """The worker's Redis: the configured one, else the broker's."""
    client, _ = open_redis(settings.redis_url, settings.data_dir, fallback_url=app.conf.broker_url)
    return client


@app.task(name=TRAIN_REWARD_MODEL, bind=True)
def train_reward_model(self, min_rankings: int = 1, who: str = "") -> dict:
    settings = FlywheelConfig.load()
    client = redis_client(settings)
    try:
        client.delete(REWARD_MODEL_TRIGGER_KEY)
        report = run_reward_model_training(
            settings, client, min_rankings=min_rankings, who=who or f"celery:{self.request.hostname}",
            metrics=REWARD_MODEL_METRICS, cache=_CACHE)
        if report.outcome == "promoted" and settings.policy.train_after_reward_model:
            train_policy.apply_async(kwargs={"who": f"reward model v{report.version}"})
            log.info("enqueued a policy run for reward model v%d", report.version)
        return report.to_dict()
    finally:
        client.close()


@app.task(name=TRAIN_POLICY, bind=True)
def train_policy(self, who: str = "", iterations: int | None = None) -> dict:
    settings = FlywheelConfig.load()
    client = redis_client(settings)
    try:
        report = run_policy_training(settings, client, who=who or f"celery:{self.request.hostname}",
                                     metrics=PPO_METRICS, cache=_POLICY_CACHE, iterations=iterations)
        return report.to_dict()
    finally:
        client.close()


def trigger_if_ready(client: redis_lib.Redis, settings: FlywheelConfig) -> bool:
    """Enqueue a reward-model run when enough new rankings wait and none is running or queued."""
    threshold = max(1, settings.reward_model.trigger_rankings)
    if client.exists(REWARD_MODEL_RUN_LOCK_KEY):
        return False
    if RankingStreamReader(client).waiting(threshold) < threshold:
        return False
    if not client.set(REWARD_MODEL_TRIGGER_KEY, socket.gethostname(), nx=True,
                      ex=max(60, int(settings.reward_model.lock_seconds))):
        return False
    train_reward_model.apply_async(kwargs={"min_rankings": threshold, "who": "trigger"})
    log.info("enqueued a reward-model run: at least %d new rankings", threshold)
    return True


def _watch(settings: FlywheelConfig) -> None:
    client = redis_client(settings)
    while not _WATCHER_STOP.wait(settings.reward_model.check_seconds):
        try:
            trigger_if_ready(client, settings)
        except redis_lib.RedisError as exc:
            log.warning("reward-model trigger check failed: %s", exc)


@signals.worker_ready.connect
def _start_worker_services(sender=None, **_kwargs) -> None:
    """Metrics and the trigger watcher, in workers that consume the training queue only (every
    worker imports these tasks; a labelling worker must not take the training metrics port)."""
    if not worker_consumes(getattr(sender, "app", None), TRAINING_QUEUE):
        return
    settings = FlywheelConfig.load()
    if settings.training.metrics_port:
        start_http_server(settings.training.metrics_port, registry=METRICS_REGISTRY)
        log.info("training metrics on :%d/metrics", settings.training.metrics_port)
        try:
            client = redis_client(settings)
            REWARD_MODEL_METRICS.current_version.set(
                open_registry(client, settings.data_dir, REWARD_MODEL_KIND).current_version())
            PPO_METRICS.current_version.set(open_registry(client, settings.data_dir, POLICY_KIND).current_version())
            client.close()
        except redis_lib.RedisError as exc:
            log.warning("could not read the current reward model and policy: %s", exc)
    if settings.reward_model.check_seconds > 0:
        _WATCHER_STOP.clear()
        threading.Thread(target=_watch, args=(settings,), name="reward-model trigger", daemon=True).start()


@signals.worker_shutdown.connect
def _stop_worker_services(**_kwargs) -> None:
    _WATCHER_STOP.set()
