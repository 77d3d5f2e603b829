"""A real server when the registry's pointer is lost or names a version it cannot load (issue 12,
item 4): a Redis reset keeps every request on the version served (with the pointer-missing metric
up), a server that cannot load the current version at start is not SERVING, and a refused version
is retried with backoff until it loads, without the pointer having to move."""

import shutil
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flywheel.config import FlywheelConfig
from flywheel.models import load_model
from flywheel.v1 import inference_pb2 as pb
from flywheel.v1 import inference_pb2_grpc as rpc
from serving.policy_follower import POLICY_CURRENT_KEY
from serving.server import InferenceServer
from support.auth import API_KEYS, keyed_channel
from test_hot_swap import set_pointer, wait_for_version, write_lora_version


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return load_model(str(tiny_model_dir), tiny_model_dir, "float32")


@pytest.fixture
def start_server(tiny_model_dir, tmp_path, redis_client):
    settings = FlywheelConfig.load({"model": str(tiny_model_dir), "grpc_address": "127.0.0.1:0", "metrics_port": 0,
                                    "dtype": "float32", "data_dir": str(tmp_path), "policy_poll_seconds": 0.3,
                                    "api_keys": API_KEYS}, environ={})
    servers = []

    def start():
        servers.append(InferenceServer(settings, policy_redis=redis_client).start(wait_until_ready=True))
        return servers[-1]

    yield start
    for server in servers:
        server.stop(grace=1)


def health(server) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:  # health is open: no key
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def served(server) -> int:
    stub = rpc.InferenceStub(keyed_channel(f"127.0.0.1:{server.port}"))
    return stub.Complete(pb.CompleteRequest(prompt="which?", max_new_tokens=2), timeout=30).policy_version


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_redis_reset_keeps_serving_the_version_and_alerts(start_server, redis_client, base, tmp_path):
    write_lora_version(tmp_path / "policies", 1, base.model, seed=1)
    redis_client.set(POLICY_CURRENT_KEY, 1)
    server = start_server()
    wait_for_version(server, 1)
    assert health(server) == health_pb2.HealthCheckResponse.SERVING
    redis_client.flushall()  # a reset, or a failover to an empty replica: the pointer is gone
    wait_until(lambda: server.metrics.policy_pointer_missing._value.get() == 1, 10, "the pointer-missing metric")
    time.sleep(1.0)  # several polls
    assert server.engine.policy_version == 1 and served(server) == 1, "a lost pointer moved the server to v0"
    assert health(server) == health_pb2.HealthCheckResponse.SERVING
    set_pointer(redis_client, 1)  # restored (`flywheel policies --rebuild`)
    wait_until(lambda: server.metrics.policy_pointer_missing._value.get() == 0, 10, "the metric to clear")


def test_a_server_that_cannot_load_current_is_not_serving_until_it_can(start_server, redis_client, base, tmp_path):
    policies = tmp_path / "policies"
    write_lora_version(policies, 1, base.model, seed=1)
    good = tmp_path / "good-v1"
    shutil.copytree(policies / "v1", good)
    weights = policies / "v1" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-50])  # still being copied to this replica's storage
    redis_client.set(POLICY_CURRENT_KEY, 1)
    server = start_server()
    assert server.engine.policy_version == 0
    assert health(server) == health_pb2.HealthCheckResponse.NOT_SERVING, "serves v0 while the registry says v1"
    assert server.metrics.policy_load_failures._value.get() >= 1
    shutil.copyfile(good / "adapter_model.safetensors", weights)  # the copy completes; the pointer does not move
    wait_for_version(server, 1, timeout=30)  # a retry with backoff picks it up
    wait_until(lambda: health(server) == health_pb2.HealthCheckResponse.SERVING, 10, "SERVING")
    assert served(server) == 1
