"""Celery tasks of the AI labeler, on the ``labelling`` queue.

    celery -A flywheel.app.worker worker -Q labelling --pool solo    # ranks groups; keeps the judge loaded
    celery -A flywheel.app.worker beat                               # runs feedback.schedule_labelling

The judge model is loaded once per worker process (cached by model, dtype and constitution) and
reused by every task. Settings come from ``FLYWHEEL_*`` variables; Redis is ``REDIS_URL`` (the
broker) unless ``FLYWHEEL_REDIS_URL`` names another. A labelling worker serves its own /metrics
on ``FLYWHEEL_LABELLING_METRICS_PORT``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis
from celery import signals
from prometheus_client import start_http_server

from feedback.labeler import Labeler, LabellingConfig, LabellingScheduler
from feedback.metrics import LabellingMetrics, register_stream_collector
from flywheel.celery_app import LABELLING_QUEUE, app, worker_consumes
from flywheel.metrics_registry import process_registry
from flywheel.rankings_stream import RankingStream
from flywheel.redis_server import open_redis
from flywheel.config import FlywheelConfig

if TYPE_CHECKING:
    from feedback.judge import Judge

log = logging.getLogger(__name__)

# the worker's own registry: library code never registers on prometheus_client's global one
WORKER_REGISTRY = process_registry()
_state_lock = threading.Lock()
_judges: dict[tuple, "Judge"] = {}  # (model, dtype, constitution, JudgeConfig) -> loaded judge
_worker: "WorkerState | None" = None


@dataclass
class WorkerState:
    settings: FlywheelConfig
    redis: redis.Redis
    metrics: LabellingMetrics
    labelling: LabellingConfig


def labelling_config(settings: FlywheelConfig) -> LabellingConfig:
    return LabellingConfig(delay_seconds=settings.labelling.delay_seconds, fraction=settings.labelling.fraction,
                           min_confidence=settings.labelling.min_confidence,
                           group_ttl_seconds=settings.feedback.group_ttl_seconds)


def worker_state() -> WorkerState:
    """Settings, Redis client and metrics of this process, made once."""
    global _worker
    with _state_lock:
        if _worker is None:
            settings = FlywheelConfig.load()
            client, _ = open_redis(settings.redis_url, settings.data_dir, fallback_url=app.conf.broker_url,
                                   socket_connect_timeout=5, health_check_interval=30)
            metrics = LabellingMetrics(WORKER_REGISTRY)
            register_stream_collector(WORKER_REGISTRY, RankingStream(client))
            _worker = WorkerState(settings, client, metrics, labelling_config(settings))
        return _worker


def get_judge(settings: FlywheelConfig, metrics: LabellingMetrics | None = None) -> "Judge":
    """The judge for these settings, loaded on first use and kept for the life of the process."""
    # imported here: every process that imports the Celery app (to send tasks) need not load torch
    from feedback.judge import Judge, JudgeConfig, load_constitution
    from flywheel.models import load_model

    config = JudgeConfig(settings.judge.max_text_tokens, settings.judge.batch_size, settings.judge.combine_orders)
    key = (settings.judge.model, settings.dtype, settings.judge.constitution, config)
    with _state_lock:
        judge = _judges.get(key)
        if judge is None:
            loaded = load_model(settings.judge.model, settings.data_dir, settings.dtype)
            constitution = load_constitution(settings.judge.constitution)
            judge = Judge(loaded.model, loaded.tokenizer, constitution, Judge.make_id(loaded.path, constitution),
                          config)
            _judges[key] = judge
            if metrics is not None:
                metrics.judge_loads.inc()
        return judge


@app.task(name="feedback.label_group", autoretry_for=(redis.ConnectionError, redis.TimeoutError),
          retry_backoff=True, retry_backoff_max=60, max_retries=10)
def label_group(group_id: str) -> dict:
    """Rank one group with the AI judge; appends nothing twice even when redelivered."""
    state = worker_state()
    labeler = Labeler(state.redis, get_judge(state.settings, state.metrics), state.labelling, state.metrics)
    return labeler.label(group_id).to_json()


@app.task(name="feedback.schedule_labelling", autoretry_for=(redis.ConnectionError,), max_retries=3)
def schedule_labelling() -> dict:
    """Enqueue a label_group task for every group that is due (run by celery beat)."""
    state = worker_state()
    return schedule_due_groups(state.redis, state.labelling)


def schedule_due_groups(client: redis.Redis, config: LabellingConfig, now: float | None = None,
                        connection=None) -> dict:
    """Enqueue every due group; ``connection`` (a kombu connection) overrides the app's broker."""
    scheduler = LabellingScheduler(client, config)
    enqueued = 0
    while True:
        due = scheduler.due_groups(now)
        if not due:
            break
        for group_id in due:
            # nobody waits on the result: the outcome is on the stream and in the metrics
            label_group.apply_async((group_id,), queue=LABELLING_QUEUE, ignore_result=True, connection=connection)
        scheduler.forget(due)  # only once the tasks are safely on the broker
        enqueued += len(due)
    return {"enqueued": enqueued}


app.conf.beat_schedule = {
    **(app.conf.beat_schedule or {}),
    "feedback.schedule_labelling": {
        "task": "feedback.schedule_labelling",
        "schedule": FlywheelConfig.load().labelling.schedule_seconds,
    },
}


# ---- a labelling worker's /metrics ----

_serve_metrics_in_child = False


def _serve_metrics() -> None:
    port = worker_state().settings.labelling.metrics_port
    if not port:
        return
    try:
        start_http_server(port, registry=WORKER_REGISTRY)
        log.info("labelling metrics on :%d/metrics", port)
    except OSError as exc:  # another process of this worker already serves it
        log.warning("labelling metrics not served on port %d: %s", port, exc)


@signals.celeryd_after_setup.connect
def _on_worker_setup(sender=None, instance=None, **_) -> None:
    """Serve /metrics from workers that consume the labelling queue (solo/threads pool: here)."""
    global _serve_metrics_in_child
    if not worker_consumes(getattr(instance, "app", None), LABELLING_QUEUE):
        return
    if "prefork" in str(getattr(instance, "pool_cls", "")).lower():
        _serve_metrics_in_child = True  # the tasks run in forked children; serve from there
    else:
        _serve_metrics()


@signals.worker_process_init.connect
def _on_child_start(**_) -> None:
    if _serve_metrics_in_child:
        _serve_metrics()
