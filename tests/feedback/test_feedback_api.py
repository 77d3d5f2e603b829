"""Feedback.SubmitRanking through a real gRPC server on a real Redis."""

from __future__ import annotations

import json
import time

import grpc
import pytest
import redis
from prometheus_client import CollectorRegistry

from flywheel.app.cli import main as flywheel_main
from flywheel.contracts.keys import RANKINGS_STREAM, group_key
from flywheel.contracts.rankings import SOURCE_AI, RankingEntry
from flywheel.rankings_stream import RankingStream, RankingStreamReader
from flywheel.v1 import feedback_pb2

from support.feedback import FeedbackServer, group_result


def submit(server, group_id="g1", ids=("g1-1", "g1-0"), **kw):
    return server.stub.SubmitRanking(
        feedback_pb2.SubmitRankingRequest(group_id=group_id, completion_ids=list(ids), **kw), timeout=10)


def rejected(server, code: grpc.StatusCode, **kw) -> str:
    with pytest.raises(grpc.RpcError) as info:
        submit(server, **kw)
    assert info.value.code() == code, info.value.details()
    return info.value.details()


def stream_entries(client) -> list[RankingEntry]:
    return [RankingEntry.from_fields(fields) for _, fields in client.xrange(RANKINGS_STREAM)]


def test_accepted_ranking_lands_on_the_stream_as_human(feedback_server, saved_group, redis_client):
    reply = submit(feedback_server, ids=["g1-2", "g1-0", "g1-3"], annotator_id="alice", comment="2 is exact")

    entries = redis_client.xrange(RANKINGS_STREAM)
    assert len(entries) == 1
    entry_id, fields = entries[0]
    assert entry_id.decode() == reply.stream_entry_id and not reply.duplicate
    fields = {k.decode(): v.decode() for k, v in fields.items()}
    assert fields["ranking_id"] == reply.ranking_id
    assert json.loads(fields["completion_ids"]) == ["g1-2", "g1-0", "g1-3"]
    assert fields["source"] == "human" and fields["annotator_id"] == "alice" and fields["comment"] == "2 is exact"
    assert fields["policy_version"] == "3" and float(fields["created_at"]) > 0
    assert "judge_id" not in fields and "pair_probabilities" not in fields
    assert feedback_server.metric("flywheel_rankings_accepted_total", source="human") == 1


def test_nine_completions_is_the_most_one_ranking_takes(feedback_server, group_store):
    group_store.save(group_result("big", [f"answer {i}" for i in range(10)]))
    submit(feedback_server, group_id="big", ids=[f"big-{i}" for i in range(9)])
    details = rejected(feedback_server, grpc.StatusCode.INVALID_ARGUMENT, group_id="big",
                       ids=[f"big-{i}" for i in range(10)])
    assert "at most 9" in details


@pytest.mark.parametrize("ids, reason, words", [
    (["g1-0"], "too_few", "at least 2"),
    ([], "too_few", "at least 2"),
    (["g1-0", "g1-1", "g1-0"], "repeated_id", "repeated: 'g1-0'"),
    (["g1-0", "g2-1"], "unknown_completion", "g2-1"),
])
def test_invalid_rankings_are_invalid_argument(feedback_server, saved_group, redis_client, ids, reason, words):
    assert words in rejected(feedback_server, grpc.StatusCode.INVALID_ARGUMENT, ids=ids)
    assert redis_client.xlen(RANKINGS_STREAM) == 0
    assert feedback_server.metric("flywheel_rankings_rejected_total", source="human", reason=reason) == 1


def test_unknown_and_expired_groups_are_not_found(feedback_server, saved_group, redis_client):
    assert "does not exist or has expired" in rejected(feedback_server, grpc.StatusCode.NOT_FOUND, group_id="nope",
                                                       ids=["nope-0", "nope-1"])
    redis_client.pexpire(group_key("g1"), 1)  # the group's TTL runs out
    time.sleep(0.01)
    rejected(feedback_server, grpc.StatusCode.NOT_FOUND)
    assert redis_client.xlen(RANKINGS_STREAM) == 0
    assert feedback_server.metric("flywheel_rankings_rejected_total", source="human", reason="unknown_group") == 2


def test_clients_cannot_pass_as_the_ai_labeler(feedback_server, saved_group, redis_client):
    rejected(feedback_server, grpc.StatusCode.PERMISSION_DENIED, annotator_id="ai:labeler")
    submit(feedback_server, annotator_id="bob")
    assert [e.source for e in stream_entries(redis_client)] == ["human"]


def test_same_idempotency_key_returns_the_first_acknowledgement(feedback_server, saved_group, redis_client):
    first = submit(feedback_server, idempotency_key="k-1")
    again = submit(feedback_server, idempotency_key="k-1")
    assert (again.ranking_id, again.stream_entry_id) == (first.ranking_id, first.stream_entry_id)
    assert again.duplicate and not first.duplicate
    # still acknowledged after the group expired: a retry must never turn into an error
    redis_client.delete(group_key("g1"))
    late = submit(feedback_server, idempotency_key="k-1")
    assert late.ranking_id == first.ranking_id and late.duplicate
    assert redis_client.xlen(RANKINGS_STREAM) == 1
    assert feedback_server.stub.GetFeedbackStats(feedback_pb2.GetFeedbackStatsRequest()).human_rankings == 1
    assert feedback_server.metric("flywheel_rankings_accepted_total", source="human") == 1


def test_idempotency_keys_belong_to_their_annotator(feedback_server, saved_group, redis_client):
    """Another annotator who sends the same idempotency key gets its own ranking recorded, not the
    first annotator's acknowledgement."""
    mine = submit(feedback_server, annotator_id="fay", idempotency_key="shared-key")
    theirs = submit(feedback_server, ids=("g1-0", "g1-1"), annotator_id="gus", idempotency_key="shared-key")
    assert not theirs.duplicate and theirs.ranking_id != mine.ranking_id
    assert redis_client.xlen(RANKINGS_STREAM) == 2
    assert submit(feedback_server, annotator_id="fay", idempotency_key="shared-key").ranking_id == mine.ranking_id


def test_a_named_annotator_ranks_a_group_once(feedback_server, saved_group, redis_client):
    from concurrent.futures import ThreadPoolExecutor

    first = submit(feedback_server, annotator_id="dana", idempotency_key="d-1")
    details = rejected(feedback_server, grpc.StatusCode.ALREADY_EXISTS, ids=("g1-0", "g1-1"), annotator_id="dana",
                       idempotency_key="d-2")
    assert "dana" in details and "g1" in details
    assert submit(feedback_server, annotator_id="dana", idempotency_key="d-1").ranking_id == first.ranking_id

    # racing submissions by one person under different keys: exactly one is recorded
    def race(i):
        try:
            return submit(feedback_server, annotator_id="erin", idempotency_key=f"e-{i}")
        except grpc.RpcError as exc:
            return exc.code()

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(race, range(8)))
    assert outcomes.count(grpc.StatusCode.ALREADY_EXISTS) == 7
    submit(feedback_server, annotator_id="frank")  # other people still may
    assert [e.annotator_id for e in stream_entries(redis_client)] == ["dana", "erin", "frank"]
    assert feedback_server.metric("flywheel_rankings_rejected_total", source="human", reason="already_ranked") == 8


def test_concurrent_retries_with_one_key_record_once(feedback_server, saved_group, redis_client):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: submit(feedback_server, idempotency_key="same"), range(16)))
    assert len({r.ranking_id for r in replies}) == 1
    assert sum(not r.duplicate for r in replies) == 1
    assert redis_client.xlen(RANKINGS_STREAM) == 1


def test_stats_report_stream_and_consumer_groups(feedback_server, saved_group, redis_client):
    for i in range(3):
        submit(feedback_server, ids=[f"g1-{i}", "g1-3"])
    reader = RankingStreamReader(redis_client, consumer="rm-1")
    got = reader.claim(2)
    reader.acknowledge([got[0][0]])
    stats = feedback_server.stub.GetFeedbackStats(feedback_pb2.GetFeedbackStatsRequest())
    assert (stats.rankings_total, stats.human_rankings, stats.ai_rankings, stats.stream_length) == (3, 3, 0, 3)
    assert [(g.name, g.pending, g.lag) for g in stats.consumer_groups] == [("reward-model", 1, 1)]
    assert feedback_server.metric("flywheel_rankings_stream_entries") == 3
    assert feedback_server.metric("flywheel_rankings_pending_entries", consumer_group="reward-model") == 1
    assert feedback_server.metric("flywheel_rankings_lag_entries", consumer_group="reward-model") == 1


def test_redis_down_is_unavailable_and_a_restart_loses_nothing(feedback_server, saved_group, redis_server,
                                                                redis_client):
    accepted = [submit(feedback_server, ids=["g1-0", "g1-1"], idempotency_key="before").ranking_id]
    redis_server.stop()
    details = rejected(feedback_server, grpc.StatusCode.UNAVAILABLE, idempotency_key="during")
    assert "unavailable" in details and "retry" in details
    assert "redis" not in details.lower() and str(redis_server.port) not in details  # no internals
    assert feedback_server.metric("flywheel_rankings_rejected_total", source="human", reason="unavailable") == 1
    assert feedback_server.metric("flywheel_rankings_redis_up") == 0
    redis_server.start()
    # the client retries with the same key and gets through; the group and the first ranking survived
    accepted.append(submit(feedback_server, ids=["g1-0", "g1-1"], idempotency_key="during").ranking_id)
    assert submit(feedback_server, idempotency_key="before").duplicate
    assert [e.ranking_id for e in stream_entries(redis_client)] == accepted


def test_cli_rank_and_stats(feedback_server, saved_group, capsys):
    address = ["--grpc-address", feedback_server.address]
    assert flywheel_main(["rank", "g1", "g1-3", "g1-1", "--annotator", "carol", *address]) == 0
    assert "stored as stream entry" in capsys.readouterr().out
    assert flywheel_main(["rank", "g1", "g1-3", "g1-3", *address]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
    assert flywheel_main(["feedback", "stats", *address]) == 0
    out = capsys.readouterr().out
    assert "rankings: 1 (1 human, 0 ai)" in out and "stream length: 1" in out


def test_works_with_a_client_that_decodes_responses(redis_server, saved_group):
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    server = FeedbackServer(client, CollectorRegistry())
    try:
        first = submit(server, idempotency_key="x")
        assert submit(server, idempotency_key="x").ranking_id == first.ranking_id
        stats = server.stub.GetFeedbackStats(feedback_pb2.GetFeedbackStatsRequest())
        assert stats.human_rankings == 1 and stats.stream_length == 1
    finally:
        server.close()
        client.close()


def test_client_keys_cannot_collide_with_the_labelers(feedback_server, saved_group, redis_client):
    stream = RankingStream(redis_client)
    ai = stream.append(RankingEntry("g1", ["g1-0", "g1-1"], "ai", judge_id="j", confidence=0.5), "j:g1")
    human = submit(feedback_server, idempotency_key="j:g1")
    assert not human.duplicate and human.ranking_id != ai.ranking_id
    assert stream.find_duplicate(SOURCE_AI, "j:g1").ranking_id == ai.ranking_id
