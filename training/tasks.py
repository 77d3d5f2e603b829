"""Celery tasks of the training queue, and what a training worker runs beside them.

- ``training.train_reward_model``: one incremental reward-model run (skips when another holds the
  lock or fewer than ``min_rankings`` rankings wait).
- A watcher thread in each worker checks the rankings stream every ``reward_model_check_seconds``
  and queues ``training.train_reward_model`` once ``reward_model_trigger_rankings`` new rankings
  have arrived, unless a reward-model run is running, queued or unfinished.
- ``training.train_policy``: one PPO run (skips when another holds the lock or there is no reward
  model yet); queued after every promoted reward model (``policy_train_after_reward_model``) and
  by ``flywheel train policy``, never while one waits already.
- A second watcher thread queues again, every ``training_rerun_check_seconds``, a run whose worker
  died (``flywheel.run_ledger``: its record outlived its lock); a second delivery of a run that is
  running or finished does nothing.
- ``/metrics`` on ``training_metrics_port``.

The models stay loaded in the worker process between runs (``RewardModelCache``, ``PolicyModelCache``).
"""

from __future__ import annotations

import logging
import socket
import threading

import redis as redis_lib
from celery import Celery, signals
from celery.exceptions import Ignore
from prometheus_client import start_http_server

from flywheel.celery_app import TRAINING_QUEUE, app, worker_consumes
from flywheel.metrics_registry import process_registry
from flywheel.contracts.artifacts import POLICY_KIND, REWARD_MODEL_KIND
from flywheel.contracts.keys import REWARD_MODEL_RUN_LOCK_KEY
from flywheel.rankings_stream import RankingStreamReader
from flywheel.redis_server import open_redis
from flywheel.registry import open_registry
from flywheel.run_ledger import (TRAIN_POLICY, TRAIN_REWARD_MODEL, DuplicateDelivery, RunAttempt, done_ttl_seconds,
                                 enqueue_run, queued_ttl_seconds, rerun_orphans, running, task_started)
from flywheel.config import FlywheelConfig
from training.metrics import PPOMetrics, RewardModelMetrics
from training.policy_run import PolicyModelCache, run_policy_training
from training.reward_model_run import RewardModelCache, run_reward_model_training

log = logging.getLogger(__name__)

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


def enqueue(client: redis_lib.Redis, settings: FlywheelConfig, kind: str, kwargs: dict,
            celery: Celery | None = None) -> tuple[str, bool]:
    """Queue a ``kind`` run on ``celery``'s broker (default: this worker's app) unless one waits
    already: (its task id, whether this call queued it)."""
    return enqueue_run(celery or app, client, kind, kwargs, queued_ttl_seconds(settings))


def _run_task(task, kind: str, settings: FlywheelConfig, client: redis_lib.Redis, run) -> dict:
    """One delivery of a run task: leaves the queue (the queued marker), then ``run(attempt)``
    under the run ledger; a second delivery of a run that is running or done stores no result."""
    request = task.request
    attempt = None
    if request.id:  # a delivery by the broker (not a direct call)
        task_started(client, kind, request.id)
        attempt = RunAttempt(request.id, task.name, dict(request.kwargs or {}), request.hostname or socket.gethostname(),
                             done_ttl_seconds(settings))
    try:
        return run(attempt).to_dict()
    except DuplicateDelivery as exc:
        log.warning("%s", exc)
        raise Ignore() from exc  # the run's own delivery reports its result; this one records none


@app.task(name=TRAIN_REWARD_MODEL, bind=True)
def train_reward_model(self, min_rankings: int = 1, who: str = "") -> dict:
    settings = FlywheelConfig.load()
    client = redis_client(settings)
    try:
        def run(attempt):
            report = run_reward_model_training(
                settings, client, min_rankings=min_rankings, who=who or f"celery:{self.request.hostname}",
                metrics=REWARD_MODEL_METRICS, cache=_CACHE, attempt=attempt)
            if report.outcome == "promoted" and settings.policy.train_after_reward_model:
                task_id, queued = enqueue(client, settings, POLICY_KIND, {"who": f"reward model v{report.version}"})
                log.info("%s a policy run for reward model v%d (%s)", "queued" if queued else "already queued",
                         report.version, task_id)
            return report

        return _run_task(self, REWARD_MODEL_KIND, settings, client, run)
    finally:
        client.close()


@app.task(name=TRAIN_POLICY, bind=True)
def train_policy(self, who: str = "", iterations: int | None = None) -> dict:
    settings = FlywheelConfig.load()
    client = redis_client(settings)
    try:
        return _run_task(self, POLICY_KIND, settings, client, lambda attempt: run_policy_training(
            settings, client, who=who or f"celery:{self.request.hostname}", metrics=PPO_METRICS,
            cache=_POLICY_CACHE, iterations=iterations, attempt=attempt))
    finally:
        client.close()


def trigger_if_ready(client: redis_lib.Redis, settings: FlywheelConfig, celery: Celery | None = None) -> bool:
    """Queue a reward-model run when enough new rankings wait and none is running, queued, or
    unfinished (a dead worker's run, which ``rerun_orphans`` queues again). ``celery``: the app
    whose broker gets it (default: this worker's)."""
    threshold = max(1, settings.reward_model.trigger_rankings)
    if client.exists(REWARD_MODEL_RUN_LOCK_KEY) or running(client, REWARD_MODEL_RUN_LOCK_KEY):
        return False
    if RankingStreamReader(client).waiting(threshold) < threshold:
        return False
    task_id, queued = enqueue(client, settings, REWARD_MODEL_KIND, {"min_rankings": threshold, "who": "trigger"},
                              celery)
    if queued:
        log.info("queued a reward-model run %s: at least %d new rankings", task_id, threshold)
    return queued


def rerun_killed_runs(client: redis_lib.Redis, settings: FlywheelConfig) -> list:
    """Queue again every run whose worker died (its record outlived its lock), once."""
    return rerun_orphans(app, client, queued_ttl_seconds=queued_ttl_seconds(settings),
                         done_ttl_seconds=done_ttl_seconds(settings), max_attempts=settings.training.max_run_attempts)


def _watch(settings: FlywheelConfig, every: float, check, what: str) -> None:
    client = redis_client(settings)
    while not _WATCHER_STOP.wait(every):
        try:
            check(client, settings)
        except redis_lib.RedisError as exc:
            log.warning("%s failed: %s", what, exc)


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
    _WATCHER_STOP.clear()
    for every, check, what in [(settings.reward_model.check_seconds, trigger_if_ready, "reward-model trigger"),
                               (settings.training.rerun_check_seconds, rerun_killed_runs, "killed-run check")]:
        if every > 0:
            threading.Thread(target=_watch, args=(settings, every, check, what), name=what, daemon=True).start()


@signals.worker_shutdown.connect
def _stop_worker_services(**_kwargs) -> None:
    _WATCHER_STOP.set()
