"""Celery tasks of the AI labeler, on the ``labelling`` queue.

    celery -A flywheel.app.worker worker -Q labelling --pool solo    # ranks groups; keeps the judge loaded
    celery -A flywheel.app.worker beat                               # runs feedback.schedule_labelling

The judge is made once per worker process (cached by its settings) and reused by every task:
a model loaded here, or with ``FLYWHEEL_JUDGE_URL`` an OpenAI-compatible endpoint
(``feedback.remote_judge``; its key from ``FLYWHEEL_JUDGE_API_KEY`` or ``_FILE``). Settings come
from ``FLYWHEEL_*`` variables; Redis is ``REDIS_URL`` (the broker) unless ``FLYWHEEL_REDIS_URL``
names another. A labelling worker serves its own /metrics
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

from feedback.labeler import Labeler, LabellingConfig, LabellingScheduler, put_back
from feedback.metrics import LabellingMetrics, register_stream_collector
from feedback.pairwise import JudgeUnavailableError
from flywheel.celery_app import LABELLING_QUEUE, app, worker_consumes
from flywheel.metrics_registry import process_registry
from flywheel.rankings_stream import RankingStream
from flywheel.redis_server import open_redis
from flywheel.config import FlywheelConfig

if TYPE_CHECKING:
    from feedback.pairwise import PairwiseJudge

log = logging.getLogger(__name__)

# the worker's own registry: library code never registers on prometheus_client's global one
WORKER_REGISTRY = process_registry()
_state_lock = threading.Lock()
_judges: dict[tuple, "PairwiseJudge"] = {}  # what makes a judge (model or endpoint, ...) -> the judge
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
                           group_ttl_seconds=settings.feedback.group_ttl_seconds,
                           retry_seconds=settings.labelling.retry_seconds)


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


def get_judge(settings: FlywheelConfig, metrics: LabellingMetrics | None = None) -> "PairwiseJudge":
    """The judge for these settings, made on first use and kept for the life of the process: an
    OpenAI-compatible endpoint when ``judge_url`` is set, else a model loaded here."""
    from feedback.pairwise import JudgeConfig, load_constitution

    judge_settings = settings.judge
    config = JudgeConfig(judge_settings.max_text_tokens, judge_settings.batch_size, judge_settings.combine_orders)
    if judge_settings.url:
        key = ("remote", judge_settings.url, judge_settings.model, judge_settings.api, judge_settings.top_logprobs,
               judge_settings.timeout_seconds, judge_settings.constitution, config)
    else:
        key = (judge_settings.model, settings.dtype, judge_settings.constitution, config)
    with _state_lock:
        judge = _judges.get(key)
        if judge is None:
            constitution = load_constitution(judge_settings.constitution)
            if judge_settings.url:
                from feedback.remote_judge import JudgeEndpoint, RemoteJudge

                try:
                    api_key = judge_settings.endpoint_key()
                except ValueError as exc:
                    raise JudgeUnavailableError(str(exc), "config") from None
                endpoint = JudgeEndpoint(judge_settings.url, api_key, judge_settings.model,
                                         judge_settings.api, judge_settings.top_logprobs,
                                         judge_settings.timeout_seconds)
                judge = RemoteJudge(endpoint, constitution, config)
                log.info("AI judge: %r (judge id %s)", judge, judge.judge_id)
            else:
                # imported here: every process that imports the Celery app (to send tasks) need not load torch
                from feedback.judge import Judge
                from flywheel.models import load_model

                loaded = load_model(judge_settings.model, settings.data_dir, settings.dtype, settings.device)
                judge = Judge(loaded.model, loaded.tokenizer, constitution, Judge.make_id(loaded.path, constitution),
                              config)
                if metrics is not None:
                    metrics.judge_loads.inc()
            _judges[key] = judge
        return judge


@app.task(name="feedback.label_group", autoretry_for=(redis.ConnectionError, redis.TimeoutError),
          retry_backoff=True, retry_backoff_max=60, max_retries=10)
def label_group(group_id: str) -> dict:
    """Rank one group with the AI judge; appends nothing twice even when redelivered."""
    state = worker_state()
    try:
        judge = get_judge(state.settings, state.metrics)
    except JudgeUnavailableError as error:  # e.g. the key file cannot be read: the group waits for a fix
        outcome = put_back(state.redis, group_id, state.labelling, error, state.metrics)
        state.metrics.groups.labels(outcome.outcome).inc()
        log.error("group %s not labelled, back among the candidates: %s", group_id, error)
        return outcome.to_json()
    return Labeler(state.redis, judge, state.labelling, state.metrics).label(group_id).to_json()


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
