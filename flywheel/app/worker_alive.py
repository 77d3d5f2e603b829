"""``flywheel worker-alive``: the liveness probe of a Celery worker (Kubernetes, compose).

Exits 0 while the worker's heartbeat file (``FLYWHEEL_WORKER_HEARTBEAT_FILE``, which the worker
process rewrites every ``FLYWHEEL_WORKER_HEARTBEAT_SECONDS``, idle or in the middle of a run) is
younger than ``FLYWHEEL_WORKER_ALIVE_MAX_AGE_SECONDS``, 1 otherwise, with one line saying how old
it is and what the worker was doing. It reads one local file: no broker, no Redis, no ping that
a busy ``--pool solo`` worker could not answer.
"""

from __future__ import annotations

import argparse
import sys

from flywheel.app.tables import plain_text
from flywheel.config import WorkerHealthConfig, add_config_flags, config_from_args
from flywheel.worker_heartbeat import check


def register(subparsers) -> None:
    parser = subparsers.add_parser("worker-alive", help="liveness probe of a Celery worker (its heartbeat file)",
                                   description=plain_text(__doc__),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(parser, WorkerHealthConfig)
    parser.set_defaults(handler=worker_alive_command)


def worker_alive_command(args: argparse.Namespace) -> int:
    section = config_from_args(args).worker
    if not section.heartbeat_file:
        print("flywheel worker-alive: no heartbeat file: set FLYWHEEL_WORKER_HEARTBEAT_FILE (or "
              "--worker-heartbeat-file) to the file the worker writes", file=sys.stderr)
        return 2
    liveness = check(section.heartbeat_file, section.alive_max_age_seconds)
    print(liveness.message, file=sys.stdout if liveness.alive else sys.stderr)
    return 0 if liveness.alive else 1
