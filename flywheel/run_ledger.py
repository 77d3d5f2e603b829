"""The ledger of training runs in Redis: what is queued, what runs, what finished.

The broker alone gets three things wrong for runs that last hours on workers that may die: a run
killed with its worker comes back only after the visibility timeout (6 h); a run longer than the
visibility timeout is delivered a second time while it still runs; and a trigger that fires again
while its run waits in the queue (behind a PPO run on the one worker) queues it again. The ledger
keeps, per kind of run (``reward_model``, ``policy``):

- a **queued marker** (``run_queued_key(kind)``: the waiting task's id, ``SET NX`` with a TTL of the
  visibility timeout), set when a run is queued and cleared when it starts: ``enqueue_run`` never
  queues a second run of a kind while one waits, it answers with the waiting one's id;
- a **run record** (``run_record_key(lock_key)``: task id, task, kwargs, lock token, worker,
  attempt), written by the run that took the kind's fenced lock and deleted when it finishes. A
  record whose lock has expired is a run whose worker died: ``rerun_orphans`` (every training
  worker calls it every ``training_rerun_check_seconds``) queues it again, *with the same task
  id*, so whoever waits on the task's result gets the rerun's. A run killed this way reruns within
  the lock's TTL plus one check (about 90 s with the defaults), not after 6 h; one that killed its
  worker ``training_max_run_attempts`` times is abandoned, logged, not queued forever;
- a **done marker** (``run_done_key(task_id)``) once the run finished: any later delivery of the
  same task (the broker's own redelivery of the killed run's first message, hours later) is a
  no-op. A delivery that finds its own run still holding the lock is a no-op too. Both raise
  ``DuplicateDelivery``; the task logs it, counts it (``outcome="duplicate"``) and stores no result,
  so the run's real result is the one its caller gets.

A run that took the lock over an unfinished record of another task (a new trigger that started
before the rerun) does that task's work too (a run of a kind trains on whatever waits): it names
the older task in its record and marks it done when it finishes.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import redis as redis_lib

from flywheel.config import FlywheelConfig
from flywheel.contracts.artifacts import POLICY_KIND, REWARD_MODEL_KIND
from flywheel.contracts.keys import (POLICY_RUN_LOCK_KEY, REWARD_MODEL_RUN_LOCK_KEY, RUN_DONE_KEY_PREFIX, run_done_key,
                                     run_queued_key, run_record_key)

log = logging.getLogger(__name__)

TRAIN_REWARD_MODEL = "training.train_reward_model"
TRAIN_POLICY = "training.train_policy"

RUN_KINDS = {REWARD_MODEL_KIND: (REWARD_MODEL_RUN_LOCK_KEY, TRAIN_REWARD_MODEL),
             POLICY_KIND: (POLICY_RUN_LOCK_KEY, TRAIN_POLICY)}
"""kind -> (its run lock's key, the task that runs it)."""


def queued_ttl_seconds(settings: FlywheelConfig) -> float:
    """How long a queued run's marker lives: a queued run starts within one run's time (shorter
    than the visibility timeout), so one older than that was lost (a purged queue)."""
    return settings.celery.visibility_timeout_seconds


def done_ttl_seconds(settings: FlywheelConfig) -> float:
    """How long a finished run's marker lives: past the broker's own redelivery of the run's message."""
    return max(2 * settings.celery.visibility_timeout_seconds, 86400.0)


class DuplicateDelivery(Exception):
    """This delivery's run is running elsewhere or has finished: nothing to do."""


@dataclass(frozen=True)
class RunAttempt:
    """The task delivery a run executes for (``celery.Task.request``)."""

    task_id: str
    task: str
    kwargs: dict
    worker: str
    done_ttl_seconds: float = 2 * 86400.0


_COMPARE_DELETE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
def _compare_delete(client: redis_lib.Redis, key: str, value: str) -> bool:
    return bool(int(client.eval(_COMPARE_DELETE, 1, key, value)))


def enqueue_run(app, client: redis_lib.Redis, kind: str, kwargs: dict, ttl_seconds: float) -> tuple[str, bool]:
    """Queue the ``kind`` run unless one already waits: ``(task id, queued now)``. The marker is set
    before the message is sent (a crash in between leaves a marker that expires, never two runs)."""
    from uuid import uuid4

    task_id = str(uuid4())
    queued = client.set(run_queued_key(kind), task_id, nx=True, ex=max(1, int(ttl_seconds)))
    if not queued:
        waiting = client.get(run_queued_key(kind))
        if waiting is not None:
            return waiting.decode(), False
        return enqueue_run(app, client, kind, kwargs, ttl_seconds)  # it started in between: queue anew
    try:
        app.send_task(RUN_KINDS[kind][1], kwargs=kwargs, task_id=task_id)
    except BaseException:
        _compare_delete(client, run_queued_key(kind), task_id)
        raise
    return task_id, True


def task_started(client: redis_lib.Redis, kind: str, task_id: str) -> None:
    """The run of ``task_id`` left the queue: a trigger may queue the next one."""
    _compare_delete(client, run_queued_key(kind), task_id)


def running(client: redis_lib.Redis, lock_key: str) -> dict[str, str]:
    """The record of the run that took ``lock_key`` last and has not finished ({} if none)."""
    return {k.decode(): v.decode() for k, v in client.hgetall(run_record_key(lock_key)).items()}


def is_done(client: redis_lib.Redis, task_id: str) -> bool:
    return bool(client.exists(run_done_key(task_id)))


def record_start(client: redis_lib.Redis, lock_key: str, attempt: RunAttempt, token: str) -> dict[str, str]:
    """Called by the lock's holder right after taking it: this run is the lock's now. Returns the record."""
    before = running(client, lock_key)
    supersedes = [t for t in before.get("supersedes", "").split(",") if t]
    if before.get("task_id") == attempt.task_id:
        number = int(before.get("attempt", "0")) + 1
    else:
        number = 1
        if before.get("task_id"):
            supersedes.append(before["task_id"])
            log.warning("run %s takes over the unfinished run %s (%s, worker %s): it does its work",
                        attempt.task_id, before["task_id"], before.get("task"), before.get("worker"))
    record = {"task_id": attempt.task_id, "task": attempt.task, "kwargs": json.dumps(attempt.kwargs),
              "token": token, "worker": attempt.worker, "started": f"{time.time():.3f}", "attempt": str(number),
              "supersedes": ",".join(supersedes)}
    pipe = client.pipeline(transaction=True)
    pipe.delete(run_record_key(lock_key))
    pipe.hset(run_record_key(lock_key), mapping=record)
    pipe.execute()
    return record


_FINISH_RUN = """
local record = KEYS[1]
for i = 2, #KEYS do redis.call('SET', KEYS[i], ARGV[2], 'EX', ARGV[1]) end
if redis.call('HGET', record, 'token') == ARGV[3] then redis.call('DEL', record) end
return 1
"""


def record_finish(client: redis_lib.Redis, lock_key: str, attempt: RunAttempt, token: str, outcome: str) -> None:
    """The run finished (whatever its outcome): mark its task (and those it took over) done and
    delete its record, in one script, before the lock is released."""
    record = running(client, lock_key)
    ids = [attempt.task_id]
    if record.get("token") == token:
        ids += [t for t in record.get("supersedes", "").split(",") if t]
    done = json.dumps({"outcome": outcome, "at": time.time(), "worker": attempt.worker})
    client.eval(_FINISH_RUN, 1 + len(ids), run_record_key(lock_key), *(run_done_key(t) for t in ids),
                max(1, int(attempt.done_ttl_seconds)), done, token)


_TAKE_ORPHAN = """
local id = redis.call('HGET', KEYS[1], 'task_id')
if not id then return nil end
if redis.call('EXISTS', KEYS[2]) == 1 or redis.call('EXISTS', KEYS[3]) == 1 then return nil end
local record = redis.call('HGETALL', KEYS[1])
if tonumber(redis.call('HGET', KEYS[1], 'attempt') or '1') >= tonumber(ARGV[2]) then
  redis.call('DEL', KEYS[1])
  redis.call('SET', ARGV[4] .. id, ARGV[5], 'EX', ARGV[3])
  table.insert(record, 1, 'abandoned')
  return record
end
redis.call('SET', KEYS[3], id, 'EX', ARGV[1])
table.insert(record, 1, 'rerun')
return record
"""


@dataclass(frozen=True)
class Orphan:
    """A run whose worker died: queued again (``action="rerun"``) or given up (``"abandoned"``)."""

    kind: str
    action: str
    task_id: str
    task: str
    attempt: int
    worker: str


def rerun_orphans(app, client: redis_lib.Redis, *, queued_ttl_seconds: float, done_ttl_seconds: float,
                  max_attempts: int) -> list[Orphan]:
    """Queue again, with its own task id, every run whose record outlived its lock and that is not
    queued already; abandon one that has been started ``max_attempts`` times. One script per kind
    decides and sets the queued marker, so of several workers sweeping at once one queues it."""
    found = []
    for kind, (lock_key, _task) in RUN_KINDS.items():
        reply = client.eval(_TAKE_ORPHAN, 3, run_record_key(lock_key), lock_key, run_queued_key(kind),
                            max(1, int(queued_ttl_seconds)), max_attempts, max(1, int(done_ttl_seconds)),
                            RUN_DONE_KEY_PREFIX, json.dumps({"outcome": "abandoned", "at": time.time()}))
        if not reply:
            continue
        action, fields = reply[0].decode(), [v.decode() for v in reply[1:]]
        record = dict(zip(fields[::2], fields[1::2]))
        orphan = Orphan(kind, action, record["task_id"], record["task"], int(record.get("attempt", "1")),
                        record.get("worker", ""))
        if action == "abandoned":
            log.error("the %s run %s (%s) killed its worker %d times (last %s): abandoned, not queued again",
                      kind, orphan.task_id, orphan.task, orphan.attempt, orphan.worker)
        else:
            try:
                app.send_task(record["task"], kwargs=json.loads(record.get("kwargs") or "{}"), task_id=orphan.task_id)
            except BaseException:
                _compare_delete(client, run_queued_key(kind), orphan.task_id)
                raise
            log.warning("the %s run %s (%s) lost its worker %s mid-run (attempt %d): queued again",
                        kind, orphan.task_id, orphan.task, orphan.worker, orphan.attempt)
        found.append(orphan)
    return found
