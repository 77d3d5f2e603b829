"""The one Celery app of every Flywheel worker.

Redis is the broker and result backend; JSON is the only serializer (no pickle anywhere). Tasks
are acknowledged late and re-queued if their worker dies, and a worker takes one task at a time,
because labelling and training tasks are long. Labelling and training have separate queues so
they can run on different machines (training on GPU nodes).

This module is the app only: it imports no task module, so a process that only sends tasks (by
name, as the CLI does) loads no part's code. Workers and beat start from ``flywheel.app.worker``,
which imports the task modules:

    celery -A flywheel.app.worker worker -Q labelling
    celery -A flywheel.app.worker worker -Q training
"""

from __future__ import annotations

import os
import ssl
from urllib.parse import parse_qs, urlsplit

from celery import Celery

from flywheel.settings import Settings

LABELLING_QUEUE = "labelling"
TRAINING_QUEUE = "training"

CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE,
             "CERT_REQUIRED": ssl.CERT_REQUIRED, "CERT_OPTIONAL": ssl.CERT_OPTIONAL, "CERT_NONE": ssl.CERT_NONE}


def redis_ssl_options(url: str) -> dict | None:
    """For a ``rediss://`` URL, the TLS options Celery's broker and backend need (they refuse a
    rediss URL without them): certificate checks on unless the URL says ``ssl_cert_reqs=none``,
    and the CA / client certificate files the URL names (the query parameters redis-py reads)."""
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return None
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    reqs = query.get("ssl_cert_reqs", "required")
    if reqs not in CERT_REQS:
        raise ValueError(f"REDIS_URL: ssl_cert_reqs must be required, optional or none; got {reqs!r}")
    options: dict = {"ssl_cert_reqs": CERT_REQS[reqs]}
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if query.get(name):
            options[name] = query[name]
    return options


def broker_url() -> str:
    """The one Redis URL of every process: FLYWHEEL_REDIS_URL, else REDIS_URL (as resolve_redis_url reads it)."""
    return os.environ.get("FLYWHEEL_REDIS_URL") or os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"


def worker_consumes(worker_app: Celery | None, queue: str) -> bool:
    """Whether a starting worker (its app, from a worker signal) consumes ``queue``: every worker
    imports every task module (``flywheel.app.worker``), and a module's worker-side services
    belong only to its own queue."""
    queues = getattr(getattr(worker_app, "amqp", None), "queues", None)
    return queues is not None and queue in queues.consume_from


def make_celery(redis_url: str | None = None, settings: Settings | None = None) -> Celery:
    """The app on ``redis_url``, else the settings' redis_url, else ``broker_url()``; ``settings``
    (default: from the environment) also give the redelivery timings of the broker."""
    settings = settings or Settings.load()
    url = redis_url or settings.redis_url or broker_url()
    app = Celery("flywheel", broker=url, backend=url)
    tls = redis_ssl_options(url)
    if tls is not None:
        app.conf.update(broker_use_ssl=tls, redis_backend_use_ssl=tls)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        result_expires=24 * 3600,
        broker_connection_retry_on_startup=True,
        # a task whose worker died (SIGKILL, lost node) is still unacknowledged: the broker delivers it
        # again once it has been out this long, and a worker sweeps for such tasks every interval
        broker_transport_options={"visibility_timeout": settings.task_visibility_timeout_seconds,
                                  "unacked_restore_interval": settings.task_restore_interval_seconds,
                                  "unacked_restore_throttle": 1},
        task_default_queue=TRAINING_QUEUE,
        task_routes={"feedback.*": {"queue": LABELLING_QUEUE}, "training.*": {"queue": TRAINING_QUEUE}},
        worker_hijack_root_logger=False,
    )
    app.autodiscover_tasks(lambda: [], force=True)
    return app


app = make_celery()
