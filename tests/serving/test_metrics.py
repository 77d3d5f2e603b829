"""What an operator reads from a real serving process (``build_server``, real Redis, auth on):
every RPC counted with its code, per-request figures split by policy version, process metrics
without ``_created`` series, the registry's pointer and every promotion and rollback (with who and
why) read from Redis at scrape time, health per service, and the retry hint stock clients honour."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import generate_latest

from flywheel.app.serve import build_server
from flywheel.config import FlywheelConfig
from flywheel.contracts.artifacts import POLICY_KIND
from flywheel.grpc_client import open_channel
from flywheel.models import load_model
from flywheel.policy_admin import rollback_policy
from flywheel.registry import open_registry
from flywheel.v1 import admin_pb2, admin_pb2_grpc, feedback_pb2, feedback_pb2_grpc
from flywheel.v1 import inference_pb2 as pb
from flywheel.v1 import inference_pb2_grpc as rpc

from support.auth import ADMIN_KEY, API_KEYS, CLIENT_KEY, keyed_channel
from test_admin import register_lora_version, wait_served

INFERENCE, FEEDBACK, ADMIN = "flywheel.v1.Inference", "flywheel.v1.Feedback", "flywheel.v1.Admin"


def settings_for(model_dir, data_dir, redis_url, **overrides) -> FlywheelConfig:
    values = {"model": str(model_dir), "grpc_address": "127.0.0.1:0", "metrics_port": 0, "dtype": "float32",
              "data_dir": str(data_dir), "redis_url": redis_url, "api_keys": API_KEYS, "policy_poll_seconds": 0.5,
              "client_requests_per_second": 0, "admin_requests_per_second": 0}
    return FlywheelConfig.load(values | overrides, environ={})


@pytest.fixture
def platform(tiny_model_dir, tmp_path, redis_server, redis_client):
    base = load_model(str(tiny_model_dir), tmp_path, "float32").model
    registry = open_registry(redis_client, tmp_path, POLICY_KIND)
    register_lora_version(registry, base, seed=1)
    server, release = build_server(settings_for(tiny_model_dir, tmp_path, redis_server.url))
    server.start(wait_until_ready=True)
    yield server, registry
    server.stop(grace=1)
    release()


def sample(server, name, **labels) -> float:
    return server.metrics.registry.get_sample_value(name, labels) or 0.0


def test_every_rpc_is_counted_by_service_method_and_code(platform):
    server, _ = platform
    address = f"127.0.0.1:{server.port}"
    with keyed_channel(address) as client, keyed_channel(address, ADMIN_KEY) as admin, \
            keyed_channel(address, None) as keyless:
        rpc.InferenceStub(client).Complete(pb.CompleteRequest(prompt="hi", max_new_tokens=2), timeout=30)
        with pytest.raises(grpc.RpcError):
            rpc.InferenceStub(client).Complete(pb.CompleteRequest(prompt="hi", n=99), timeout=30)
        feedback_pb2_grpc.FeedbackStub(client).GetFeedbackStats(feedback_pb2.GetFeedbackStatsRequest(), timeout=10)
        admin_pb2_grpc.AdminStub(admin).GetStatus(admin_pb2.GetStatusRequest(), timeout=10)
        with pytest.raises(grpc.RpcError):  # a client key on Admin
            admin_pb2_grpc.AdminStub(client).GetStatus(admin_pb2.GetStatusRequest(), timeout=10)
        with pytest.raises(grpc.RpcError):  # no key at all
            rpc.InferenceStub(keyless).Complete(pb.CompleteRequest(prompt="hi"), timeout=10)
        health_pb2_grpc.HealthStub(keyless).Check(health_pb2.HealthCheckRequest(), timeout=5)
    counted = {labels: sample(server, "flywheel_requests_total", service=labels[0], method=labels[1], code=labels[2])
               for labels in [(INFERENCE, "Complete", "OK"), (INFERENCE, "Complete", "INVALID_ARGUMENT"),
                              (FEEDBACK, "GetFeedbackStats", "OK"), (ADMIN, "GetStatus", "OK"),
                              (ADMIN, "GetStatus", "PERMISSION_DENIED"), (INFERENCE, "Complete", "UNAUTHENTICATED")]}
    assert set(counted.values()) == {1.0}, counted
    # health is probed every few seconds and stays out of the figures
    text = generate_latest(server.metrics.registry).decode()
    assert "grpc.health" not in text
    # the duration has the code too: the 5 ms refusal is not among the served requests' latencies
    assert sample(server, "flywheel_request_duration_seconds_count", service=INFERENCE, method="Complete",
                  code="OK") == 1
    assert sample(server, "flywheel_request_duration_seconds_count", service=INFERENCE, method="Complete",
                  code="INVALID_ARGUMENT") == 1


def test_per_request_figures_split_by_policy_version(platform):
    server, _ = platform
    v0, v1 = {"policy_version": "0"}, {"policy_version": "1"}
    request = pb.CompleteRequest(prompt="Count to ten", n=2, max_new_tokens=5, min_new_tokens=5)
    with keyed_channel(f"127.0.0.1:{server.port}", ADMIN_KEY) as channel:
        stub = rpc.InferenceStub(channel)
        response = stub.Complete(request, timeout=30)
        assert sample(server, "flywheel_finished_completions_total", finish_reason="length", **v0) == 2
        assert sample(server, "flywheel_completion_generated_tokens_count", **v0) == 2
        assert sample(server, "flywheel_completion_generated_tokens_sum", **v0) == 10
        assert sample(server, "flywheel_request_prompt_tokens_sum", **v0) == response.prompt_token_count
        assert sample(server, "flywheel_generated_tokens_total", **v0) == 10
        assert sample(server, "flywheel_prompt_tokens_total", **v0) == response.prompt_token_count
        for histogram in ("flywheel_request_queue_time_seconds", "flywheel_time_to_first_token_seconds",
                          "flywheel_inter_token_latency_seconds", "flywheel_e2e_request_latency_seconds"):
            assert sample(server, f"{histogram}_count", **v0) == 1, histogram
        # each mean gap between tokens is shorter than the request took from arrival to its last token
        assert (sample(server, "flywheel_inter_token_latency_seconds_sum", **v0)
                < sample(server, "flywheel_e2e_request_latency_seconds_sum", **v0))
        # after a hot-swap, the same figures under the new version
        admin_pb2_grpc.AdminStub(channel).Promote(admin_pb2.PromoteRequest(version=1, reason="test"), timeout=10)
        wait_served(stub, 1)
        before = sample(server, "flywheel_finished_completions_total", finish_reason="length", **v1)
        stub.Complete(request, timeout=30)
    assert sample(server, "flywheel_finished_completions_total", finish_reason="length", **v1) == before + 2
    for histogram in ("flywheel_request_queue_time_seconds", "flywheel_time_to_first_token_seconds",
                      "flywheel_inter_token_latency_seconds", "flywheel_e2e_request_latency_seconds",
                      "flywheel_completion_generated_tokens", "flywheel_request_prompt_tokens"):
        assert sample(server, f"{histogram}_count", **v1) >= 1, histogram
    assert sample(server, "flywheel_generated_tokens_total", **v1) >= 10


def test_a_stream_the_client_leaves_counts_as_cancelled(platform):
    server, _ = platform
    with keyed_channel(f"127.0.0.1:{server.port}") as channel:
        stream = rpc.InferenceStub(channel).StreamComplete(pb.CompleteRequest(prompt="a long story",
                                                                              max_new_tokens=400), timeout=60)
        next(stream)
        stream.cancel()
    deadline = time.monotonic() + 20
    while sample(server, "flywheel_finished_completions_total", finish_reason="cancelled", policy_version="0") < 1:
        assert time.monotonic() < deadline, "the left stream's completion was never counted"
        time.sleep(0.05)
    while sample(server, "flywheel_requests_total", service=INFERENCE, method="StreamComplete", code="CANCELLED") < 1:
        assert time.monotonic() < deadline, "the left stream was never counted"
        time.sleep(0.05)


def test_process_metrics_are_there_and_created_series_are_not(platform):
    server, _ = platform
    text = generate_latest(server.metrics.registry).decode()
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
                 "python_gc_objects_collected_total", "python_info"):
        assert f"\n{name}" in text, name
    assert "_created" not in text


def test_the_registry_pointer_and_every_change_are_read_from_redis_at_scrape_time(platform):
    server, registry = platform
    with keyed_channel(f"127.0.0.1:{server.port}", ADMIN_KEY) as channel:
        admin_pb2_grpc.AdminStub(channel).Promote(admin_pb2.PromoteRequest(version=1, reason="better answers"),
                                                  metadata=(("x-flywheel-operator", "alice"),), timeout=10)
    assert sample(server, "flywheel_registry_current_version", kind="policy") == 1
    promoted = sample(server, "flywheel_registry_change_timestamp_seconds", kind="policy", action="promote",
                      from_version="0", to_version="1", who="alice (key operator)", why="better answers")
    assert abs(promoted - time.time()) < 60
    # a rollback by another process (the CLI writes to the registry directly): seen at the next scrape
    rollback_policy(registry, None, "bob", "the answers got worse")
    assert sample(server, "flywheel_registry_current_version", kind="policy") == 0
    assert sample(server, "flywheel_registry_change_timestamp_seconds", kind="policy", action="rollback",
                  from_version="1", to_version="0", who="bob", why="the answers got worse") >= promoted
    # the gate's figures of each version, from its manifest
    assert sample(server, "flywheel_registry_version_figure", kind="policy", version="1", figure="reward_gain") == 0.5
    assert sample(server, "flywheel_registry_current_version", kind="reward_model") == 0


def test_health_reports_every_service_of_the_port(platform):
    server, _ = platform
    with keyed_channel(f"127.0.0.1:{server.port}", None) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", INFERENCE, FEEDBACK, ADMIN):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING, service


def test_a_refusal_carries_grpc_pushback_and_the_client_channel_retries_after_it(tiny_model_dir, tmp_path,
                                                                                 redis_server):
    settings = settings_for(tiny_model_dir, tmp_path, redis_server.url, client_requests_per_second=2,
                            client_request_burst=1)
    server, release = build_server(settings)
    server.start(wait_until_ready=True)
    try:
        address = f"127.0.0.1:{server.port}"
        stats = feedback_pb2.GetFeedbackStatsRequest()
        with keyed_channel(address) as bare:  # a channel without a retry policy sees the refusal and its hints
            feedback_pb2_grpc.FeedbackStub(bare).GetFeedbackStats(stats, timeout=10)
            with pytest.raises(grpc.RpcError) as refused:
                feedback_pb2_grpc.FeedbackStub(bare).GetFeedbackStats(stats, timeout=10)
            trailers = dict(refused.value.trailing_metadata())
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert trailers["grpc-retry-pushback-ms"] == trailers["retry-after-ms"] and int(trailers["retry-after-ms"]) > 0
        client = FlywheelConfig.load({"api_key": CLIENT_KEY, "data_dir": str(tmp_path)}, environ={})
        limited_before = sample(server, "flywheel_rate_limited_requests_total", role="client")
        with open_channel(client, address) as channel:  # the CLI's channel: its retry policy waits as told
            stub = feedback_pb2_grpc.FeedbackStub(channel)
            for _ in range(3):
                stub.GetFeedbackStats(stats, timeout=10)
        assert sample(server, "flywheel_rate_limited_requests_total", role="client") > limited_before
    finally:
        server.stop(grace=1)
        release()
