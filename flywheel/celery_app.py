"""The one Celery app of every Flywheel worker.

Redis is the broker and result backend; JSON is the only serializer (no pickle anywhere). Tasks
are acknowledged late and re-queued if their worker dies, and a worker takes one task at a time,
because labelling and training tasks are long. Labelling and training have separate queues so
they can run on different machines (training on GPU nodes):

    celery -A flywheel.celery_app worker -Q labelling
    celery -A flywheel.celery_app worker -Q training
"""

from __future__ import annotations

import os

from celery import Celery

from flywheel.settings import Settings

LABELLING_QUEUE = "labelling"
TRAINING_QUEUE = "training"

# modules whose tasks the workers load; each part adds its own tasks module here
TASK_MODULES = ["feedback.tasks", "training.tasks"]


def make_celery(redis_url: str | None = None, settings: Settings | None = None) -> Celery:
    settings = settings or Settings.load()
    url = redis_url or os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    app = Celery("flywheel", broker=url, backend=url)
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
for _module in TASK_MODULES:
    try:
        __import__(_module)
    except ModuleNotFoundError as exc:  # a part not yet built
        if exc.name != _module:
            raise
