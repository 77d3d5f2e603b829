"""The Celery entry of every worker and of beat: the one app (``flywheel.celery_app``) with every
part's task modules imported, so a worker knows every task and beat gets the labelling schedule
(which ``feedback.tasks`` adds to the app):

    celery -A flywheel.app.worker worker -Q labelling --pool solo    # the AI labeler
    celery -A flywheel.app.worker worker -Q training --pool solo     # reward-model and PPO runs
    celery -A flywheel.app.worker beat                               # the labelling schedule

Each tasks module starts its worker-side services only in workers that consume its own queue
(``flywheel.celery_app.worker_consumes``).
"""

from __future__ import annotations

import feedback.tasks  # noqa: F401 (registers feedback.label_group, feedback.schedule_labelling)
import training.tasks  # noqa: F401 (registers training.train_reward_model, training.train_policy)
from flywheel.celery_app import app

__all__ = ["app"]
