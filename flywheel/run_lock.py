"""A Redis lock that a dead worker cannot hold forever, with fencing.

The lock is a key with a TTL (``SET NX PX``) whose value is a fencing token: a number from a
counter (``run_lock_fence_key``) that grows with every acquisition, so a later holder's token is
always larger. A heartbeat thread extends the key while it still holds this holder's token. A
worker killed with SIGKILL stops extending it, so it expires after ``ttl_seconds`` and the next run
can start.

A holder paused (or cut off from Redis) for longer than the TTL has lost its lease even though it
still runs: the heartbeat notices (the key holds another token, or no extension succeeded within
the TTL) and marks the lease lost; ``check()`` then raises ``LeaseLost``, which the run skeleton
calls between its steps, and every registry change a run makes names its ``fence`` so a stale
holder cannot promote even in the moment before it notices. Release deletes the key only if it
still holds this holder's token (a Lua compare-and-delete).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, TypeVar

import redis as redis_lib

from flywheel import run_ledger as ledger
from flywheel.contracts.keys import run_lock_fence_key
from flywheel.registry import Fence, LeaseLost
from flywheel.run_ledger import DuplicateDelivery, RunAttempt

R = TypeVar("R")

log = logging.getLogger(__name__)

_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RunLock:
    """``with RunLock(client, REWARD_MODEL_RUN_LOCK_KEY, 60) as held: if held: ...`` (keys: ``flywheel.contracts.keys``)"""

    def __init__(self, client: redis_lib.Redis, key: str, ttl_seconds: float = 60.0,
                 on_lost: Callable[[str], None] | None = None) -> None:
        self.client = client
        self.key = key
        self.ttl_seconds = ttl_seconds
        self.on_lost = on_lost
        self.token = ""
        self.held = False
        self.lost_why = ""
        self._extend_script = client.register_script(_EXTEND)
        self._release_script = client.register_script(_RELEASE)
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._extended_at = 0.0

    @property
    def fence(self) -> Fence:
        """What a registry change of this holder names, so that it only passes while the lock is ours."""
        return Fence(self.key, self.token)

    def acquire(self) -> bool:
        token = str(self.client.incr(run_lock_fence_key(self.key)))
        self.held = bool(self.client.set(self.key, token, nx=True, px=int(self.ttl_seconds * 1000)))
        if self.held:
            self.token, self.lost_why = token, ""
            self._extended_at = time.monotonic()
            self._stop.clear()
            self._heartbeat = threading.Thread(target=self._extend, name=f"heartbeat {self.key}", daemon=True)
            self._heartbeat.start()
        return self.held

    def check(self) -> None:
        """Raise ``LeaseLost`` once the lease is gone: the run must stop, another may hold the lock."""
        if self.held and not self.lost_why and time.monotonic() - self._extended_at > self.ttl_seconds:
            self._lose(f"no heartbeat reached Redis for {self.ttl_seconds:.0f} s (the lock's TTL)")
        if self.lost_why:
            raise LeaseLost(f"lost the lock {self.key} (token {self.token}): {self.lost_why}")

    def _lose(self, why: str) -> None:
        if self.lost_why:
            return
        self.lost_why = why
        log.error("run lock %s lost: %s; the run aborts at its next step", self.key, why)
        if self.on_lost is not None:
            self.on_lost(why)

    def _extend(self) -> None:
        while not self._stop.wait(self.ttl_seconds / 3):
            try:
                if int(self._extend_script(keys=[self.key], args=[self.token, int(self.ttl_seconds * 1000)])):
                    self._extended_at = time.monotonic()
                else:
                    holder = self.client.get(self.key)
                    self._lose(f"the lock now holds token {holder.decode() if holder else '(none)'}")
                    return
            except redis_lib.RedisError as exc:  # Redis is away: retry until the TTL runs out
                log.warning("could not extend lock %s: %s", self.key, exc)
                if time.monotonic() - self._extended_at > self.ttl_seconds:
                    self._lose(f"Redis unreachable for longer than the TTL ({exc})")
                    return

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        if self.held:
            try:
                if not int(self._release_script(keys=[self.key], args=[self.token])):
                    log.warning("lock %s had expired (or passed to another run) before release", self.key)
            except redis_lib.RedisError as exc:
                log.warning("could not release lock %s (it expires by itself): %s", self.key, exc)
        self.held = False

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def run_exclusively(lock: RunLock, metrics, name: str, skipped: R, body: Callable[[float], R],
                    attempt: RunAttempt | None = None) -> R:
    """Run ``body(started)`` while holding ``lock`` (``skipped`` when another run holds it), and
    count the outcome and duration on ``metrics`` (its ``runs`` counter and ``run_duration``).

    With the ``attempt`` (the task delivery) the run is kept in the run ledger
    (``flywheel.run_ledger``): a delivery whose run holds the lock already, or has finished, raises
    ``DuplicateDelivery``; the holder's record stays until the run finishes, so a run whose
    worker dies (or whose lease lapses, or whose Redis fails) is queued again once the lock is free."""
    if not lock.acquire():
        holder = ledger.running(lock.client, lock.key) if attempt is not None else {}
        if attempt is not None and holder.get("task_id") == attempt.task_id:
            _count(metrics, "duplicate")
            raise DuplicateDelivery(f"{name} run {attempt.task_id} is running already (worker {holder.get('worker')}, "
                                    f"lock token {holder.get('token')}): this delivery does nothing")
        return skipped
    started = time.monotonic()
    finished, outcome = False, "failed"
    # wall-clock times: runs of a kind on several workers can be put in order from their logs
    log.info("%s run took lock %s (token %s) at %.3f", name, lock.key, lock.token, time.time())
    try:
        if attempt is not None:
            if ledger.is_done(lock.client, attempt.task_id):
                _count(metrics, "duplicate")
                raise DuplicateDelivery(f"{name} run {attempt.task_id} has finished already: this delivery does nothing")
            ledger.record_start(lock.client, lock.key, attempt, lock.token)
        report = body(started)
        finished, outcome = True, report.outcome
    except DuplicateDelivery:
        raise
    except BaseException as exc:
        _count(metrics, "lease_lost" if isinstance(exc, LeaseLost) else "failed")
        # an ordinary error finishes the run (a rerun would fail alike); a lost lease, a Redis
        # failure or the process being stopped leave it unfinished, to be queued again
        finished = isinstance(exc, Exception) and not isinstance(exc, (LeaseLost, redis_lib.RedisError))
        raise
    finally:
        if attempt is not None and finished and not lock.lost_why:
            try:
                ledger.record_finish(lock.client, lock.key, attempt, lock.token, outcome)
            except redis_lib.RedisError as exc:  # the record stays: the run is queued again, and redone
                log.warning("could not record the %s run %s as finished: %s", name, attempt.task_id, exc)
        log.info("%s run releases lock %s (token %s) at %.3f", name, lock.key, lock.token, time.time())
        lock.release()
    if metrics is not None:
        metrics.runs.labels(report.outcome).inc()
        if report.outcome != "skipped":
            metrics.run_duration.observe(time.monotonic() - started)
    log.info("%s run %s: %s", name, report.outcome, report.reason)
    return report


def _count(metrics, outcome: str) -> None:
    if metrics is not None:
        metrics.runs.labels(outcome).inc()
