"""A worker's liveness as a file its process keeps fresh, and the check a liveness probe runs.

``celery inspect ping`` is answered by the worker's consumer loop, which a ``--pool solo`` worker
does not run while a task runs: a probe built on it kills every run longer than its failure
window. A thread of the worker process instead rewrites a small JSON file every ``interval``
seconds, idle or in the middle of a run, with what the worker is doing (the task and since when).
A process that is stopped (``SIGSTOP``, a hung node), deadlocked in the interpreter (the thread
needs the GIL), or gone stops refreshing it, so the file's age is what the probe checks:

    flywheel worker-alive --worker-heartbeat-file /tmp/flywheel-worker.alive --worker-alive-max-age-seconds 120

exits 0 while the file is younger than the limit, 1 (saying how old, and what the worker was
doing) otherwise. The file is written to a temporary name and renamed, so the probe never reads
half a file. It belongs on the container's own filesystem (``/tmp``), never on a volume shared by
several workers.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class WorkerHeartbeat:
    """``WorkerHeartbeat(path, interval).start()``; ``task_started``/``task_finished`` name the work."""

    def __init__(self, path: str | Path, interval: float) -> None:
        self.path = Path(path)
        self.interval = interval
        self.task: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "WorkerHeartbeat":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.beat()
        self._thread = threading.Thread(target=self._run, name="worker heartbeat", daemon=True)
        self._thread.start()
        log.info("worker heartbeat: %s every %.0f s", self.path, self.interval)
        return self

    def task_started(self, task_id: str, name: str) -> None:
        self.task = {"id": task_id, "name": name, "since": time.time()}
        self.beat()

    def task_finished(self) -> None:
        self.task = None
        self.beat()

    def beat(self) -> None:
        record = {"pid": os.getpid(), "at": time.time(), "task": self.task}
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            temporary.write_text(json.dumps(record))
            os.replace(temporary, self.path)
        except OSError as exc:  # a full disk: the file ages and the probe says so
            log.warning("could not write the worker heartbeat %s: %s", self.path, exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()

    def stop(self) -> None:
        self._stop.set()


@dataclass
class Liveness:
    alive: bool
    message: str


def check(path: str | Path, max_age_seconds: float, now: float | None = None) -> Liveness:
    """Whether the heartbeat at ``path`` is younger than ``max_age_seconds`` (its own time stamp,
    not the file's mtime: a copied or restored file does not look fresh)."""
    path = Path(path)
    now = time.time() if now is None else now
    try:
        record = json.loads(path.read_text())
        at = float(record["at"])
    except FileNotFoundError:
        return Liveness(False, f"no heartbeat file {path}: the worker has not started (or writes elsewhere)")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return Liveness(False, f"unreadable heartbeat file {path}: {exc}")
    age = now - at
    task = record.get("task") or None
    doing = (f"running {task.get('name')}[{task.get('id')}] for {now - float(task.get('since', now)):.0f} s"
             if isinstance(task, dict) else "idle")
    if age > max_age_seconds:
        return Liveness(False, f"worker pid {record.get('pid')} last beat {age:.1f} s ago (limit "
                               f"{max_age_seconds:g} s), {doing}: stopped or hung")
    return Liveness(True, f"worker pid {record.get('pid')} alive, beat {age:.1f} s ago, {doing}")
