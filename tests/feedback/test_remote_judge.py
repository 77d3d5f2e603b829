"""RLAIF with a judge on an OpenAI-compatible endpoint: a second Flywheel server (the embedded
SmolLM2 on its HTTP API, its own Redis) judges the groups the first one (a tiny policy) served.

The remote judge's log-odds equal the local judge's on the same model; a real labelling worker
configured only by FLYWHEEL_JUDGE_URL and a key file ranks a served group onto the stream with
source ``ai``; a person ranking the same group moves the agreement the server exports; a judge
that fails loses no group and is counted."""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry

from feedback.judge import Judge, load_constitution
from feedback.labeler import JUDGE_ERROR, Labeler, LabellingConfig, LabellingScheduler, return_to_candidates
from feedback.metrics import LabellingMetrics
from feedback.pairwise import JudgeUnavailableError
from feedback.remote_judge import COMPLETIONS, JudgeEndpoint, RemoteJudge, verdict_log_odds
from feedback.tasks import schedule_due_groups
from flywheel.celery_app import LABELLING_QUEUE, app
from flywheel.contracts.keys import LABELLING_CANDIDATES_KEY, RANKINGS_STREAM
from flywheel.contracts.rankings import RankingEntry
from flywheel.group_store import GroupStore
from flywheel.models import load_model
from flywheel.redis_server import free_port

from support.auth import CLIENT_KEY
from support.feedback import group_result
from support.servers import serving_process
from test_feedback_labelling_worker import ANSWERS, Worker, wait_for

openai = pytest.importorskip("openai", reason="the dev extra installs the openai SDK")

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "What is the capital of France?"


def test_verdict_letters_are_read_from_the_listed_first_tokens():
    assert verdict_log_odds([("A", math.log(0.6)), (" A", math.log(0.2)), ("B", math.log(0.1))]) == \
        pytest.approx(math.log(0.8 / 0.1))
    # a letter outside the top k gets the smallest listed log-probability: never overstated
    assert verdict_log_odds([("A", -0.1), ("The", -3.0)]) == pytest.approx(-0.1 + 3.0)
    assert verdict_log_odds([("The", -0.1), ("It", -3.0)]) == 0.0  # neither letter: no evidence


def rank_over_http(port: int, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/rankings", data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json",
                                                             "Authorization": f"Bearer {CLIENT_KEY}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


@pytest.fixture(scope="module")
def embedded_judge_model():
    return load_model("", ROOT / ".flywheel", "float32")  # converted once into the checkout's data dir


@pytest.fixture(scope="module")
def judge_server(embedded_judge_model, tmp_path_factory):
    """The second Flywheel: the embedded model on its OpenAI-compatible API, with its own Redis."""
    with serving_process(tmp_path_factory.mktemp("judge-server"), embedded_judge_model.path,
                         http_port=free_port()) as server:
        yield server


@pytest.fixture(scope="module")
def judge_url(judge_server) -> str:
    return f"http://127.0.0.1:{judge_server.http_port}/v1"


@pytest.fixture(scope="module")
def policy_server(tiny_model_dir, tmp_path_factory):
    """The first Flywheel: a tiny policy whose groups are to be judged, on its own Redis."""
    with serving_process(tmp_path_factory.mktemp("policy-server"), tiny_model_dir, http_port=free_port()) as server:
        yield server


@pytest.mark.e2e
def test_the_remote_judge_gives_the_local_judges_log_odds(embedded_judge_model, judge_url):
    constitution = load_constitution()
    local = Judge(embedded_judge_model.model, embedded_judge_model.tokenizer, constitution, "local")
    remote = RemoteJudge(JudgeEndpoint(judge_url, CLIENT_KEY), constitution)
    plain = RemoteJudge(JudgeEndpoint(judge_url, CLIENT_KEY, api=COMPLETIONS), constitution)
    right, rude = "The capital of France is Paris.", "I hate you, go away."
    pairs = [(right, rude), (rude, right)]
    local_odds = local.log_odds_a([local.render(PROMPT, a, b) for a, b in pairs])
    remote_odds = remote.log_odds_a([remote.render(PROMPT, a, b) for a, b in pairs])
    assert remote_odds == pytest.approx(local_odds, abs=0.02)  # same model, same template: same figures
    assert all(abs(x) > 0.5 for x in remote_odds)  # both letters were in the top 20, with a clear bias
    # the completions API (plain text, no chat template) reads its first token the same way
    assert all(math.isfinite(x) for x in plain.log_odds_a([plain.render(PROMPT, a, b) for a, b in pairs]))
    # the method is the local one's: both orders, exactly antisymmetric
    p_right, p_rude = remote.compare(PROMPT, pairs)
    assert p_right + p_rude == pytest.approx(1.0, abs=1e-6)
    assert remote.judge_id.startswith("127.0.0.1:") and "@constitution-" in remote.judge_id


def test_a_failing_judge_loses_no_group_and_is_counted(redis_client, tmp_path):
    GroupStore(redis_client, 3600).save(group_result("down", ANSWERS, created_at=time.time() - 120))
    config = LabellingConfig(delay_seconds=60, fraction=1.0, min_confidence=0.0, group_ttl_seconds=3600,
                             retry_seconds=30)
    registry = CollectorRegistry()
    dead = JudgeEndpoint(f"http://127.0.0.1:{free_port()}/v1", "sk-secret-judge-key", model="m", retries=0)
    labeler = Labeler(redis_client, RemoteJudge(dead, "be fair"), config, LabellingMetrics(registry))
    outcome = labeler.label("down")
    assert outcome.outcome == JUDGE_ERROR and "cannot reach it" in outcome.error and "FLYWHEEL_JUDGE_URL" in outcome.error
    assert "sk-secret-judge-key" not in outcome.error
    # back among the candidates, due again after retry_seconds; nothing reached the stream
    due_at = redis_client.zscore(LABELLING_CANDIDATES_KEY, "down")
    assert due_at == pytest.approx(time.time() - 60 + 30, abs=5)
    assert redis_client.xlen(RANKINGS_STREAM) == 0
    assert registry.get_sample_value("flywheel_labelling_judge_errors_total", {"reason": "connection"}) == 1
    assert registry.get_sample_value("flywheel_labelling_groups_total", {"outcome": JUDGE_ERROR}) == 1
    # the next try within the cool-down fails at once, without waiting on the dead endpoint again
    started = time.monotonic()
    with pytest.raises(JudgeUnavailableError, match="not asked again"):
        labeler.judge.rank("p", {"a": "x", "b": "y"})
    assert time.monotonic() - started < 0.5


def test_a_group_put_back_while_the_scheduler_enqueues_it_is_not_forgotten(redis_client):
    GroupStore(redis_client, 3600).save(group_result("race", ANSWERS, created_at=time.time() - 120))
    config = LabellingConfig(delay_seconds=60, group_ttl_seconds=3600, retry_seconds=30)
    scheduler = LabellingScheduler(redis_client, config)
    due = scheduler.due_groups()
    assert due == ["race"]
    return_to_candidates(redis_client, "race", config)  # a worker ran the task and the judge failed first
    scheduler.forget(due)  # the scheduler, done enqueueing, forgets what it enqueued
    assert redis_client.zscore(LABELLING_CANDIDATES_KEY, "race") is not None
    assert scheduler.due_groups() == []  # and it is not due again before retry_seconds


@pytest.mark.e2e
def test_a_bad_key_is_refused_with_the_servers_message(judge_url):
    judge = RemoteJudge(JudgeEndpoint(judge_url, "not-a-key", retries=0), "be fair")
    with pytest.raises(JudgeUnavailableError) as refused:
        judge.rank(PROMPT, {"a": "Paris.", "b": "Berlin."})
    assert refused.value.reason == "auth" and "HTTP 401" in str(refused.value) and "not-a-key" not in str(refused.value)


@pytest.mark.e2e
def test_a_second_flywheel_judges_the_first_and_agreement_moves_when_people_rank(
        judge_url, policy_server, tmp_path):
    redis_url = policy_server.config.redis_url
    client = redis.Redis.from_url(redis_url)
    key_file = tmp_path / "judge.key"
    key_file.write_text(CLIENT_KEY + "\n")
    key_file.chmod(0o600)
    worker = Worker(tmp_path, redis_url, None, FLYWHEEL_JUDGE_URL=judge_url,
                    FLYWHEEL_JUDGE_API_KEY_FILE=str(key_file), FLYWHEEL_JUDGE_MAX_TEXT_TOKENS="96")
    try:
        wait_for(lambda: client.exists("_kombu.binding." + LABELLING_QUEUE), 60, "the worker to consume", worker.log)
        policy = openai.OpenAI(base_url=f"http://127.0.0.1:{policy_server.http_port}/v1", api_key=CLIENT_KEY,
                               max_retries=0)
        served = policy.chat.completions.create(model=policy.models.list().data[0].id, n=3, max_tokens=12, seed=3,
                                                messages=[{"role": "user", "content": PROMPT}])
        group_id = served.model_extra["group_id"]
        ids = [c.model_extra["completion_id"] for c in served.choices]

        config = LabellingConfig(delay_seconds=0, fraction=1.0, group_ttl_seconds=3600)
        with app.connection_for_write(redis_url) as connection:
            assert schedule_due_groups(client, config, connection=connection) == {"enqueued": 1}
        entry = wait_for(lambda: next((RankingEntry.from_fields(f) for _, f in client.xrange(RANKINGS_STREAM)
                                       if f[b"source"] == b"ai"), None), 120, "the AI ranking", worker.log)
        assert entry.group_id == group_id and sorted(entry.completion_ids) == sorted(ids)
        assert entry.judge_id.startswith("127.0.0.1:") and len(entry.pair_probabilities) == 3
        assert worker.metric("flywheel_labelling_groups_total", outcome="ranked") == 1
        assert CLIENT_KEY not in worker.log.read_text()  # the key is never logged

        registry = policy_server.metrics.registry
        assert registry.get_sample_value("flywheel_ai_human_agreement_groups") == 0
        assert registry.get_sample_value("flywheel_ai_human_agreement_ratio") == 0.0
        best, middle, worst = entry.completion_ids
        human = [best, worst, middle]  # the person agrees with the judge on two of the three pairs
        status, answer = rank_over_http(policy_server.http_port, {"group_id": group_id, "completion_ids": human})
        assert status == 200, answer
        assert registry.get_sample_value("flywheel_ai_human_agreement_groups") == 1
        assert registry.get_sample_value("flywheel_ai_human_agreement_ratio") == pytest.approx(2 / 3)
    finally:
        worker.stop()
        client.close()
