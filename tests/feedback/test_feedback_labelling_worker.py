"""The AI labeler in a real Celery worker (solo pool, labelling queue) on a real Redis."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from feedback.labeler import LabellingConfig
from feedback.tasks import label_group, schedule_due_groups
from flywheel.celery_app import LABELLING_QUEUE, app
from flywheel.contracts.keys import LABELLING_CANDIDATES_KEY, RANKINGS_STREAM
from flywheel.contracts.rankings import RankingEntry
from flywheel.group_store import GroupStore
from flywheel.rankings_stream import RankingStream
from flywheel.redis_server import RedisServer, free_port

from support.feedback import group_result

ROOT = Path(__file__).resolve().parents[2]
ANSWERS = ["Four.", "2 + 2 = 4, because adding two and two makes four.", "Five.", "I like turtles."]


def wait_for(predicate, timeout: float, what: str, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


class Worker:
    def __init__(self, tmp: Path, redis_url: str, judge_dir: Path | None, **settings: str) -> None:
        """A labelling worker judging with the model in ``judge_dir``; ``settings`` add FLYWHEEL_* variables."""
        self.metrics_port = free_port()
        self.log = tmp / "worker.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
        env.update(REDIS_URL=redis_url, FLYWHEEL_DATA_DIR=str(tmp / "data"), FLYWHEEL_JUDGE_MODEL=str(judge_dir or ""),
                   FLYWHEEL_DTYPE="float32", FLYWHEEL_LABELLING_MIN_CONFIDENCE="0",
                   FLYWHEEL_LABELLING_METRICS_PORT=str(self.metrics_port), FLYWHEEL_JUDGE_BATCH_SIZE="4", **settings)
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "flywheel.app.worker", "worker", "-Q", LABELLING_QUEUE,
                 "--pool", "solo", "-c", "1", "--loglevel", "INFO", "-n", f"labelling-{self.metrics_port}@%h",
                 "--without-gossip", "--without-mingle", "--without-heartbeat"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def metric(self, name: str, **labels) -> float:
        try:
            return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)
        except OSError:
            return 0.0

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def worker_redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("worker-redis")).start()
    yield server
    server.stop(kill=True)


@pytest.fixture(scope="module")
def worker(tmp_path_factory, worker_redis, judge_model_dir):
    started = Worker(tmp_path_factory.mktemp("worker"), worker_redis.url, judge_model_dir)
    client = redis.Redis.from_url(worker_redis.url)
    # the worker declared its queue (so a published task is routed to it) and serves /metrics
    wait_for(lambda: client.exists("_kombu.binding." + LABELLING_QUEUE), 60, "the worker to consume", started.log)
    wait_for(lambda: started.metric("flywheel_rankings_redis_up") == 1, 30, "the worker's /metrics", started.log)
    yield started
    started.stop()
    client.close()


def ai_entries(client) -> dict[str, RankingEntry]:
    entries = [RankingEntry.from_fields(fields) for _, fields in client.xrange(RANKINGS_STREAM)]
    return {e.group_id: e for e in entries if e.source == "ai"}


def test_worker_ranks_due_groups_debiased_and_measures_agreement(worker, worker_redis):
    client = redis.Redis.from_url(worker_redis.url)
    store = GroupStore(client, 3600)
    now = time.time()
    store.save(group_result("w1", ANSWERS, created_at=now - 120))
    store.save(group_result("w2", ANSWERS[::-1], created_at=now - 120))  # the same answers, swapped positions
    store.save(group_result("w3", ANSWERS, created_at=now - 120))
    store.save(group_result("w4", ANSWERS, created_at=now))  # not due yet
    human = ["w3-1", "w3-0", "w3-2", "w3-3"]
    RankingStream(client).append(RankingEntry("w3", human, "human", annotator_id="erin"))

    config = LabellingConfig(delay_seconds=60, fraction=1.0, group_ttl_seconds=3600)
    with app.connection_for_write(worker_redis.url) as connection:
        assert schedule_due_groups(client, config, connection=connection) == {"enqueued": 3}
        ranked = wait_for(lambda: len(ai_entries(client)) == 3 and ai_entries(client), 90, "3 AI rankings",
                          worker.log)

        # position-debiased: the verdict follows the answers, not where they were listed
        texts = lambda group_id, entry: [ANSWERS[::-1][int(c[-1])] if group_id == "w2" else ANSWERS[int(c[-1])]
                                         for c in entry.completion_ids]
        assert texts("w1", ranked["w1"]) == texts("w2", ranked["w2"])
        for entry in ranked.values():
            assert entry.judge_id.endswith(tuple("0123456789abcdef")) and "@constitution-" in entry.judge_id
            assert len(entry.pair_probabilities) == 6 and 0.0 <= entry.confidence <= 1.0
        assert [m.decode() for m in client.zrange(LABELLING_CANDIDATES_KEY, 0, -1)] == ["w4"]
        assert RankingStream(client).stats().agreement.pairs == 6

        # a task delivered twice (e.g. after a worker died mid-task) records nothing twice
        label_group.apply_async(("w1",), queue=LABELLING_QUEUE, ignore_result=True, connection=connection)
        wait_for(lambda: worker.metric("flywheel_labelling_groups_total", outcome="already_ranked") == 1, 60,
                 "the redelivered task", worker.log)
    assert len(ai_entries(client)) == 3 and client.xlen(RANKINGS_STREAM) == 4

    assert worker.metric("flywheel_labelling_groups_total", outcome="ranked") == 3
    assert worker.metric("flywheel_rankings_accepted_total", source="ai") == 3
    assert worker.metric("flywheel_labelling_duration_seconds_count") == 3
    assert worker.metric("flywheel_labelling_comparisons_total") == 3 * 12
    assert worker.metric("flywheel_labelling_judge_loads_total") == 1  # the judge stayed loaded between tasks
    assert worker.metric("flywheel_rankings_stream_entries") == 4
    assert (worker.metric("flywheel_ai_human_agreement_pairs_total", agreement="agreed")
            + worker.metric("flywheel_ai_human_agreement_pairs_total", agreement="disagreed")) == 6
    client.close()
