"""A Redis lock that a dead worker cannot hold forever.

The lock is a key with a TTL (``SET NX PX``); a heartbeat thread extends it while the holder is
alive. A worker killed with SIGKILL stops extending it, so it expires after ``ttl_seconds`` and the
next run can start. Release only deletes the key if this holder still owns it (a token check in
Lua, via redis-py's ``Lock``).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, TypeVar

import redis as redis_lib
from redis.exceptions import LockError

R = TypeVar("R")

log = logging.getLogger(__name__)


class RunLock:
    """``with RunLock(client, REWARD_MODEL_RUN_LOCK_KEY, 60) as held: if held: ...`` (keys: ``flywheel.contracts.keys``)"""

    def __init__(self, client: redis_lib.Redis, key: str, ttl_seconds: float = 60.0) -> None:
        self.client = client
        self.key = key
        self.ttl_seconds = ttl_seconds
        self._lock = client.lock(key, timeout=ttl_seconds, blocking=False, thread_local=False)
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self.held = False

    def acquire(self) -> bool:
        self.held = bool(self._lock.acquire(blocking=False))
        if self.held:
            self._stop.clear()
            self._heartbeat = threading.Thread(target=self._extend, name=f"heartbeat {self.key}", daemon=True)
            self._heartbeat.start()
        return self.held

    def _extend(self) -> None:
        while not self._stop.wait(self.ttl_seconds / 3):
            try:
                self._lock.reacquire()
            except (LockError, redis_lib.RedisError) as exc:  # lost it (expired) or Redis is away: retry
                log.warning("could not extend lock %s: %s", self.key, exc)

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        if self.held:
            try:
                self._lock.release()
            except LockError:
                log.warning("lock %s had expired before release", self.key)
        self.held = False

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def run_exclusively(lock: RunLock, metrics, name: str, skipped: R, body: Callable[[float], R]) -> R:
    """Run ``body(started)`` while holding ``lock`` (``skipped`` when another run holds it), and
    count the outcome and duration on ``metrics`` (its ``runs`` counter and ``run_duration``)."""
    if not lock.acquire():
        return skipped
    started = time.monotonic()
    try:
        report = body(started)
    except BaseException:
        if metrics is not None:
            metrics.runs.labels("failed").inc()
        raise
    finally:
        lock.release()
    if metrics is not None:
        metrics.runs.labels(report.outcome).inc()
        if report.outcome != "skipped":
            metrics.run_duration.observe(time.monotonic() - started)
    log.info("%s run %s: %s", name, report.outcome, report.reason)
    return report
