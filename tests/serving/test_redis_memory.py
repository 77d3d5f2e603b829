"""Redis at its memory bound under a real serving process (a real redis-server with a tiny
maxmemory, noeviction): above the groups' share of maxmemory, completions keep being served, their
groups are not stored (counted, and the memory gauges say why) while promotions and run locks keep
working in the memory kept free; at the bound itself a ranking gets RESOURCE_EXHAUSTED with a clear
message, nothing crashes, and the same ranking is accepted once memory is freed."""

from __future__ import annotations

import grpc
import pytest
import redis

from flywheel.contracts.keys import REWARD_MODEL_RUN_LOCK_KEY, RANKINGS_STREAM
from flywheel.group_store import GroupStore
from flywheel.redis_server import RedisServer, memory_usage
from flywheel.run_lock import RunLock
from flywheel.v1 import admin_pb2 as admin
from flywheel.v1 import feedback_pb2 as fb
from flywheel.v1 import feedback_pb2_grpc as fb_rpc
from flywheel.v1 import inference_pb2 as pb
from flywheel.v1 import inference_pb2_grpc as rpc
from test_admin import platform, wait_served  # noqa: F401 (fixture)

from support.auth import CLIENT_KEY, keyed_channel

MAX_MEMORY = 4 * 2**20
FILLER = b"x" * 8192


@pytest.fixture
def redis_server(tmp_path):
    """Overrides the suite's Redis for test_admin's platform: the same, with a 4 MiB maxmemory."""
    server = RedisServer(tmp_path / "redis", max_memory_bytes=MAX_MEMORY).start()
    yield server
    server.stop(kill=True)


def fill_until(client: redis.Redis, fraction: float, start: int = 0) -> int:
    """Filler keys until Redis uses more than ``fraction`` of maxmemory (or refuses a write)."""
    i = start
    while memory_usage(client)[0] <= fraction * MAX_MEMORY:
        try:
            client.set(f"test:filler:{i}", FILLER)
        except redis.exceptions.OutOfMemoryError:
            break
        i += 1
    return i


def complete(stub, prompt):
    return stub.Complete(pb.CompleteRequest(prompt=prompt, n=2, max_new_tokens=3), timeout=30)


def rank(feedback, response, key):
    ids = [c.completion_id for c in response.completions]
    return feedback.SubmitRanking(fb.SubmitRankingRequest(group_id=response.group_id, completion_ids=ids[::-1],
                                                          idempotency_key=key), timeout=10)


def gauge(server, name):
    return server.metrics.registry.get_sample_value(name)


def test_a_full_redis_refuses_groups_then_rankings_clearly_and_control_state_keeps_working(platform, redis_client):
    server, _registry, admin_stub, _ = platform
    channel = keyed_channel(f"127.0.0.1:{server.port}", CLIENT_KEY)
    stub, feedback = rpc.InferenceStub(channel), fb_rpc.FeedbackStub(channel)
    groups = GroupStore(redis_client)
    ranked_later = complete(stub, "stored before Redis filled up")
    assert groups.load(ranked_later.group_id) is not None

    # above the groups' share (90%) but below the bound: serving goes on, the group is not stored
    filled = fill_until(redis_client, 0.92)
    used, most = memory_usage(redis_client)
    assert 0.9 * MAX_MEMORY < used < MAX_MEMORY and most == MAX_MEMORY
    refused = complete(stub, "served while groups are refused")
    assert len(refused.completions) == 2
    assert groups.load(refused.group_id) is None
    assert gauge(server, "flywheel_group_store_memory_refusals_total") == 1
    assert gauge(server, "flywheel_group_store_failures_total") == 1
    assert gauge(server, "flywheel_redis_memory_max_bytes") == MAX_MEMORY
    assert gauge(server, "flywheel_redis_memory_used_bytes") > 0.9 * MAX_MEMORY
    # the memory kept free is the control state's: a run lock and a promotion still go through
    lock = RunLock(redis_client, REWARD_MODEL_RUN_LOCK_KEY, ttl_seconds=30)
    assert lock.acquire()
    lock.release()
    admin_stub.Promote(admin.PromoteRequest(version=1, reason="while Redis is nearly full"), timeout=10)
    wait_served(stub, 1)

    # at the bound Redis refuses every write that needs memory: the ranking gets a clear refusal.
    # (Redis checks the bound when a command or script starts; a script started below it writes
    # on, so this one lands well past it: just at the bound, a freed buffer could let a write in.)
    filled = fill_until(redis_client, 0.95, filled)
    redis_client.eval("redis.call('SET', KEYS[1], string.rep('x', tonumber(ARGV[1])))", 1, "test:past-the-bound",
                      2**20)
    assert memory_usage(redis_client)[0] > MAX_MEMORY + 2**19
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        redis_client.set("test:one-more", FILLER)
    with pytest.raises(grpc.RpcError) as info:
        rank(feedback, ranked_later, "retry-me")
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "full" in info.value.details() and "maxmemory" in info.value.details()
    assert str(server.port) not in info.value.details() and "OOM" not in info.value.details()
    assert redis_client.xlen(RANKINGS_STREAM) == 0
    assert len(complete(stub, "still served at the bound").completions) == 2  # and reads still answer:
    assert feedback.GetFeedbackStats(fb.GetFeedbackStatsRequest(), timeout=10).stream_length == 0

    # memory freed: the client's retry with the same idempotency key is accepted, once
    redis_client.delete("test:past-the-bound", *[f"test:filler:{i}" for i in range(filled)])
    ack = rank(feedback, ranked_later, "retry-me")
    assert not ack.duplicate and rank(feedback, ranked_later, "retry-me").duplicate
    assert redis_client.xlen(RANKINGS_STREAM) == 1
    assert groups.load(complete(stub, "stored again").group_id) is not None
    channel.close()
