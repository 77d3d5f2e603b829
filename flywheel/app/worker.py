"""The Celery entry of every worker and of beat: the one app (``flywheel.celery_app``) with every
part's task modules imported, so a worker knows every task and beat gets the labelling schedule
(which ``feedback.tasks`` adds to the app):

    celery -A flywheel.app.worker worker -Q labelling --pool solo    # the AI labeler
    celery -A flywheel.app.worker worker -Q training --pool solo     # reward-model and PPO runs
    celery -A flywheel.app.worker beat                               # the labelling schedule

Each tasks module starts its worker-side services only in workers that consume its own queue
(``flywheel.celery_app.worker_consumes``). Every worker keeps its heartbeat file fresh when
``FLYWHEEL_WORKER_HEARTBEAT_FILE`` is set (``flywheel.worker_heartbeat``): the liveness probe
``flywheel worker-alive`` reads it, since a ``--pool solo`` worker answers no ``inspect ping``
while a task runs.
"""

from __future__ import annotations

from celery import signals

import feedback.tasks  # noqa: F401 (registers feedback.label_group, feedback.schedule_labelling)
import training.tasks  # noqa: F401 (registers training.train_reward_model, training.train_policy)
from flywheel.celery_app import app
from flywheel.config import FlywheelConfig
from flywheel.worker_heartbeat import WorkerHeartbeat

__all__ = ["app"]

_heartbeat: WorkerHeartbeat | None = None


@signals.worker_init.connect
def _start_heartbeat(**_kwargs) -> None:
    global _heartbeat
    section = FlywheelConfig.load().worker
    if section.heartbeat_file and _heartbeat is None:
        _heartbeat = WorkerHeartbeat(section.heartbeat_file, section.heartbeat_seconds).start()


@signals.task_prerun.connect
def _heartbeat_task_started(task_id=None, task=None, **_kwargs) -> None:
    if _heartbeat is not None:
        _heartbeat.task_started(str(task_id), getattr(task, "name", "?"))


@signals.task_postrun.connect
def _heartbeat_task_finished(**_kwargs) -> None:
    if _heartbeat is not None:
        _heartbeat.task_finished()


@signals.worker_shutdown.connect
def _stop_heartbeat(**_kwargs) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()
