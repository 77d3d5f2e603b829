"""The run ledger on a real Redis, with a real Celery app sending to it (issue 12, item 13): a queued
run is never queued twice (by the trigger, after a reward model, or by hand), a run whose holder
died is queued again with its own task id once its lock has expired, a second delivery of a run
that is running or finished does nothing, and a run that keeps killing its worker is given up.

The killed worker is simulated here by stopping the lock's heartbeat without releasing it (its
lock then expires as a SIGKILLed worker's does); tests/training/test_training_faults.py kills real
workers."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from flywheel.celery_app import make_celery
from flywheel.config import FlywheelConfig
from flywheel.contracts.artifacts import POLICY_KIND, REWARD_MODEL_KIND
from flywheel.contracts.keys import POLICY_RUN_LOCK_KEY, REWARD_MODEL_RUN_LOCK_KEY, run_queued_key, run_record_key
from flywheel import run_ledger as ledger
from flywheel.run_ledger import DuplicateDelivery, RunAttempt
from flywheel.run_lock import RunLock, run_exclusively
from support.rankings import publish_rankings
from support.synthetic import synthetic_rankings
from test_reward_celery import FLYWHEEL


@pytest.fixture
def settings(redis_server, tmp_path):
    return FlywheelConfig.load({"data_dir": str(tmp_path), "redis_url": redis_server.url}, environ={})


@pytest.fixture
def celery(redis_server, settings):
    return make_celery(redis_server.url, settings)


def queued(client) -> list[dict]:
    """The messages waiting on the training queue (kombu's Redis list, one per priority step)."""
    messages = []
    for key in sorted(client.keys("training*")):
        if client.type(key) == b"list":
            messages += [json.loads(raw) for raw in client.lrange(key, 0, -1)]
    return messages


def queued_ids(client) -> list[str]:
    return [m["headers"]["id"] for m in queued(client)]


def die_holding(lock: RunLock) -> None:
    """What SIGKILL does to a holder: the heartbeat stops, nothing is released, the lock expires."""
    lock._stop.set()
    lock._heartbeat.join(5)
    deadline = time.monotonic() + 10
    while lock.client.exists(lock.key):
        assert time.monotonic() < deadline, "the dead holder's lock never expired"
        time.sleep(0.05)


def take(client, lock_key: str, attempt: RunAttempt) -> RunLock:
    """A run of ``attempt`` that took the lock (with a short TTL) and recorded itself."""
    lock = RunLock(client, lock_key, ttl_seconds=0.5)
    assert lock.acquire()
    ledger.record_start(client, lock_key, attempt, lock.token)
    return lock


def attempt_of(task_id: str, task: str = ledger.TRAIN_POLICY, kwargs: dict | None = None) -> RunAttempt:
    return RunAttempt(task_id, task, kwargs if kwargs is not None else {"who": "test"}, "worker-a")


def test_a_queued_run_is_never_queued_twice(redis_client, celery, settings):
    first, queued_now = ledger.enqueue_run(celery, redis_client, POLICY_KIND, {"who": "a"},
                                           ledger.queued_ttl_seconds(settings))
    assert queued_now
    again, queued_again = ledger.enqueue_run(celery, redis_client, POLICY_KIND, {"who": "b"},
                                             ledger.queued_ttl_seconds(settings))
    assert (again, queued_again) == (first, False) and queued_ids(redis_client) == [first]
    # the marker lives as long as a queued run may wait (the visibility timeout), not a minute
    assert redis_client.ttl(run_queued_key(POLICY_KIND)) > 6 * 3600 - 10
    ledger.task_started(redis_client, POLICY_KIND, "another-task")  # not the queued one: the marker stays
    assert redis_client.get(run_queued_key(POLICY_KIND)).decode() == first
    ledger.task_started(redis_client, POLICY_KIND, first)  # it left the queue: the next one may be queued
    second, queued_now = ledger.enqueue_run(celery, redis_client, POLICY_KIND, {"who": "c"}, 60)
    assert queued_now and second != first and sorted(queued_ids(redis_client)) == sorted([first, second])


def test_the_trigger_queues_one_reward_model_run_however_long_it_waits(redis_client, celery, settings):
    from training.tasks import trigger_if_ready

    settings.reward_model.trigger_rankings = 16
    publish_rankings(redis_client, synthetic_rankings(20, seed=3, prefix="t"))
    assert trigger_if_ready(redis_client, settings, celery)
    for _ in range(5):  # every check of every worker while the run waits behind a PPO run
        assert not trigger_if_ready(redis_client, settings, celery)
    (message,) = queued(redis_client)
    assert message["headers"]["task"] == ledger.TRAIN_REWARD_MODEL
    # the old trigger key lived 60 s, so a run waiting longer than that was queued again every minute
    assert redis_client.ttl(run_queued_key(REWARD_MODEL_KIND)) > 3600

    # a reward-model run whose worker died is the rerun's to do: the trigger adds none beside it
    ledger.task_started(redis_client, REWARD_MODEL_KIND, message["headers"]["id"])
    die_holding(take(redis_client, REWARD_MODEL_RUN_LOCK_KEY, attempt_of(message["headers"]["id"],
                                                                         ledger.TRAIN_REWARD_MODEL)))
    assert not trigger_if_ready(redis_client, settings, celery) and len(queued(redis_client)) == 1


def test_flywheel_train_says_a_run_is_queued_already(redis_server, redis_client, tmp_path):
    import os

    env = dict(os.environ, REDIS_URL=redis_server.url, FLYWHEEL_DATA_DIR=str(tmp_path))
    outputs = [subprocess.run([*FLYWHEEL, "train", "policy", "--no-wait"], env=env, capture_output=True, text=True,
                              timeout=60, check=True).stdout for _ in range(2)]
    task_id = outputs[0].split()[-1]
    assert outputs[0].startswith("enqueued policy run ")
    assert outputs[1].strip() == f"a policy run is queued already: {task_id}"
    assert queued_ids(redis_client) == [task_id]


def test_a_run_whose_worker_died_is_queued_again_with_its_task_id_until_it_is_given_up(redis_client, celery, settings):
    kwargs = {"who": "reward model v3", "iterations": 2}
    attempt = attempt_of("run-1", kwargs=kwargs)
    lock = take(redis_client, POLICY_RUN_LOCK_KEY, attempt)

    def sweep():
        return ledger.rerun_orphans(celery, redis_client, queued_ttl_seconds=60, done_ttl_seconds=60, max_attempts=3)

    assert sweep() == []  # the holder is alive: nothing to do
    die_holding(lock)
    (orphan,) = sweep()
    assert (orphan.kind, orphan.action, orphan.task_id, orphan.attempt) == (POLICY_KIND, "rerun", "run-1", 1)
    (message,) = queued(redis_client)
    assert message["headers"]["id"] == "run-1" and message["headers"]["task"] == ledger.TRAIN_POLICY
    assert json.loads(__import__("base64").b64decode(message["body"]))[1] == kwargs
    assert sweep() == [] and len(queued(redis_client)) == 1  # queued once, however many workers sweep

    for number in (2, 3):  # the rerun starts, and dies again
        ledger.task_started(redis_client, POLICY_KIND, "run-1")
        lock = take(redis_client, POLICY_RUN_LOCK_KEY, attempt)
        assert ledger.running(redis_client, POLICY_RUN_LOCK_KEY)["attempt"] == str(number)
        die_holding(lock)
        (orphan,) = sweep()
    assert (orphan.action, orphan.attempt) == ("abandoned", 3)  # three deaths: given up, not queued forever
    assert ledger.running(redis_client, POLICY_RUN_LOCK_KEY) == {} and ledger.is_done(redis_client, "run-1")
    assert len(queued(redis_client)) == 2 and sweep() == []


def test_a_second_delivery_of_a_running_or_finished_run_does_nothing(redis_client):
    from training.run import RunReport

    attempt = attempt_of("run-7")
    lock = take(redis_client, POLICY_RUN_LOCK_KEY, attempt)  # the first delivery runs
    ran = []

    def body(started):
        ran.append(started)
        return RunReport("promoted", "gate passed", 1)

    with pytest.raises(DuplicateDelivery, match="running already"):  # the broker delivers it again meanwhile
        run_exclusively(RunLock(redis_client, POLICY_RUN_LOCK_KEY, 5), None, "policy", None, body, attempt=attempt)
    other = RunLock(redis_client, POLICY_RUN_LOCK_KEY, 5)
    assert run_exclusively(other, None, "policy", "skipped", body, attempt=attempt_of("run-8")) == "skipped"
    lock.release()

    # the rerun of the dead first delivery runs, finishes, and any later delivery of it does nothing
    report = run_exclusively(RunLock(redis_client, POLICY_RUN_LOCK_KEY, 5), None, "policy", None, body,
                             attempt=attempt)
    assert report.outcome == "promoted" and len(ran) == 1
    assert ledger.is_done(redis_client, "run-7") and not redis_client.exists(run_record_key(POLICY_RUN_LOCK_KEY))
    with pytest.raises(DuplicateDelivery, match="finished already"):
        run_exclusively(RunLock(redis_client, POLICY_RUN_LOCK_KEY, 5), None, "policy", None, body, attempt=attempt)
    assert len(ran) == 1 and not redis_client.exists(POLICY_RUN_LOCK_KEY)


def test_a_run_that_fails_is_finished_and_one_that_loses_redis_is_not(redis_client):
    import redis as redis_lib

    def fails(error):
        def body(started):
            raise error
        return body

    with pytest.raises(ValueError):
        run_exclusively(RunLock(redis_client, POLICY_RUN_LOCK_KEY, 5), None, "policy", None,
                        fails(ValueError("corrupt artifact")), attempt=attempt_of("bad"))
    assert ledger.is_done(redis_client, "bad")  # a rerun would fail alike
    with pytest.raises(redis_lib.ConnectionError):
        run_exclusively(RunLock(redis_client, POLICY_RUN_LOCK_KEY, 5), None, "policy", None,
                        fails(redis_lib.ConnectionError("Redis went away")), attempt=attempt_of("cut-off"))
    assert not ledger.is_done(redis_client, "cut-off")  # unfinished: queued again at the next sweep
    assert ledger.running(redis_client, POLICY_RUN_LOCK_KEY)["task_id"] == "cut-off"


def test_a_run_that_takes_over_an_unfinished_one_does_its_work(redis_client):
    from training.run import RunReport

    die_holding(take(redis_client, POLICY_RUN_LOCK_KEY, attempt_of("dead")))
    report = run_exclusively(RunLock(redis_client, POLICY_RUN_LOCK_KEY, 5), None, "policy", None,
                             lambda started: RunReport("rejected", "gate"), attempt=attempt_of("new"))
    assert report.outcome == "rejected"
    assert ledger.is_done(redis_client, "new") and ledger.is_done(redis_client, "dead")
    assert ledger.running(redis_client, POLICY_RUN_LOCK_KEY) == {}
