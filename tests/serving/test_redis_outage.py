"""Redis stopped (SIGKILL) and restarted under a serving process: completions keep being served,
rankings are refused with UNAVAILABLE while it is down and accepted again after, every acknowledged
ranking is still in the stream (AOF in the data directory), and the policy follower resumes. Auth stays
on throughout: API keys are checked without Redis, and the per-key rate limit (kept in Redis) lets
requests through unmetered while Redis is down."""

from __future__ import annotations

import time

import grpc
import pytest

from flywheel.v1 import admin_pb2 as admin
from flywheel.v1 import feedback_pb2 as fb
from flywheel.v1 import feedback_pb2_grpc as fb_rpc
from flywheel.v1 import inference_pb2 as pb
from flywheel.v1 import inference_pb2_grpc as rpc
from flywheel.contracts.keys import RANKINGS_STREAM
from test_admin import platform  # noqa: F401 (fixture)

from support.auth import CLIENT_KEY, keyed_channel


@pytest.fixture
def serving(platform):
    """test_admin's serving process (Redis, policy v1 and v2 registered, auth on) with Inference and
    Feedback stubs on a client key (rate-limited through Redis) and its Admin stub on the admin key."""
    server, _registry, admin_stub, _admin_inference = platform
    channel = keyed_channel(f"127.0.0.1:{server.port}", CLIENT_KEY)
    yield server, rpc.InferenceStub(channel), fb_rpc.FeedbackStub(channel), admin_stub
    channel.close()


def complete(stub, i):
    return stub.Complete(pb.CompleteRequest(prompt=f"outage {i}", n=2, max_new_tokens=3), timeout=30)


def rank(feedback, response, key):
    ids = [c.completion_id for c in response.completions]
    return feedback.SubmitRanking(fb.SubmitRankingRequest(group_id=response.group_id, completion_ids=ids[::-1],
                                                          idempotency_key=key), timeout=10)


def test_a_redis_outage_loses_no_acknowledged_ranking_and_serving_goes_on(serving, redis_server, redis_client):
    server, stub, feedback, admin_stub = serving
    acked = [rank(feedback, complete(stub, i), f"before-{i}").stream_entry_id for i in range(3)]
    waiting = complete(stub, "waiting")  # served and stored, ranked only after the outage

    redis_server.stop(kill=True)
    started = time.monotonic()
    during = [complete(stub, f"during-{i}") for i in range(4)]
    assert all(len(r.completions) == 2 and r.policy_version == 0 for r in during)
    assert time.monotonic() - started < 20, "completions waited on the dead Redis"
    assert server.metrics.group_store_failures._value.get() >= 4
    assert server.metrics.rate_limiter_errors._value.get() >= 4  # the limiter failed open, unmetered
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as keyless:  # keys are checked without Redis
        with pytest.raises(grpc.RpcError) as info:
            rpc.InferenceStub(keyless).Complete(pb.CompleteRequest(prompt="no key"), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for call in (lambda: rank(feedback, waiting, "retry-me"),
                 lambda: feedback.GetFeedbackStats(fb.GetFeedbackStatsRequest(), timeout=10),
                 lambda: admin_stub.ListPolicies(admin.ListPoliciesRequest(), timeout=10)):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "redis" not in info.value.details().lower() and str(redis_server.port) not in info.value.details()
    time.sleep(1.5)  # the follower polls a few times against the dead Redis
    assert server.follower._thread.is_alive()

    redis_server.start()  # same port, same data directory: the AOF brings everything back
    acked.append(rank(feedback, waiting, "retry-me").stream_entry_id)  # the client's retry gets through
    assert rank(feedback, complete(stub, "after"), "after").duplicate is False
    acked.append(redis_client.xrevrange(RANKINGS_STREAM, count=1)[0][0].decode())
    with pytest.raises(grpc.RpcError) as info:  # a group served during the outage was never stored
        rank(feedback, during[0], "lost-group")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

    stored = [entry_id.decode() for entry_id, _ in redis_client.xrange(RANKINGS_STREAM)]
    assert stored == acked
    assert feedback.GetFeedbackStats(fb.GetFeedbackStatsRequest(), timeout=10).human_rankings == len(acked)

    # the follower survived the outage: a promotion made now reaches this server
    admin_stub.Promote(admin.PromoteRequest(version=1, reason="after the outage"), timeout=10)
    deadline = time.monotonic() + 20
    while server.engine.policy_version != 1:
        assert time.monotonic() < deadline, "the follower did not resume after Redis came back"
        time.sleep(0.05)
    assert complete(stub, "promoted").policy_version == 1
