"""The Admin service on a real serving process: list, status, promote, rollback, audit."""

import json
import re
import time

import grpc
import pytest

from flywheel.app.serve import build_server
from flywheel.contracts.artifacts import POLICY_KIND, sha256_file
from flywheel.models import load_model
from flywheel.registry import open_registry
from flywheel.config import FlywheelConfig
from flywheel.v1 import admin_pb2 as admin
from flywheel.v1 import admin_pb2_grpc as admin_rpc
from flywheel.v1 import inference_pb2 as pb
from flywheel.v1 import inference_pb2_grpc as rpc

from support.auth import ADMIN_KEY, ADMIN_NAME, API_KEYS, keyed_channel


def register_lora_version(registry, base_model, seed):
    """Write a policy version the way the PPO run does: a LoRA adapter, checksums, then register it."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    adapter = get_peft_model(copy.deepcopy(base_model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    manifest = {"format": "lora", "parent": 0, "reward_model_version": 1, "figures": {"reward_gain": 0.5}}

    def write(folder):
        adapter.save_pretrained(folder, safe_serialization=True)
        manifest["files"] = {p.name: sha256_file(p) for p in folder.iterdir()}

    return registry.write_version(write, manifest)


@pytest.fixture
def platform(tiny_model_dir, tmp_path, redis_server, redis_client):
    settings = FlywheelConfig.load({"model": str(tiny_model_dir), "grpc_address": "127.0.0.1:0", "metrics_port": 0,
                              "dtype": "float32", "data_dir": str(tmp_path), "redis_url": redis_server.url,
                              "policy_poll_seconds": 0.5, "api_keys": API_KEYS,
                              "admin_requests_per_second": 0}, environ={})
    base = load_model(str(tiny_model_dir), tmp_path, "float32").model
    registry = open_registry(redis_client, tmp_path, POLICY_KIND)
    for seed in (1, 2):
        register_lora_version(registry, base, seed)
    server, release = build_server(settings)
    server.start(wait_until_ready=True)
    channel = keyed_channel(f"127.0.0.1:{server.port}", ADMIN_KEY)
    yield server, registry, admin_rpc.AdminStub(channel), rpc.InferenceStub(channel)
    channel.close()
    server.stop(grace=1)
    release()


def served_version(stub):
    return stub.Complete(pb.CompleteRequest(prompt="which?", max_new_tokens=2), timeout=30).policy_version


def wait_served(stub, version, timeout=20):
    deadline = time.monotonic() + timeout
    while served_version(stub) != version:
        assert time.monotonic() < deadline, f"still not serving v{version}"
        time.sleep(0.1)


OPERATOR = (("x-flywheel-operator", "alice"),)


def test_promote_and_rollback_move_every_request_and_are_audited(platform):
    server, registry, admin_stub, stub = platform
    listed = admin_stub.ListPolicies(admin.ListPoliciesRequest(), timeout=10)
    assert [p.version for p in listed.policies] == [0, 1, 2]
    assert listed.current_version == 0
    assert [p.status for p in listed.policies] == [admin.POLICY_STATUS_CURRENT, admin.POLICY_STATUS_CANDIDATE,
                                                   admin.POLICY_STATUS_CANDIDATE]
    assert listed.policies[1].format == "lora" and listed.policies[1].gate_metrics["reward_gain"] == 0.5

    change = admin_stub.Promote(admin.PromoteRequest(version=1, reason="better"), metadata=OPERATOR, timeout=10)
    assert (change.from_version, change.to_version) == (0, 1)
    wait_served(stub, 1)
    admin_stub.Promote(admin.PromoteRequest(version=2, reason="even better"), metadata=OPERATOR, timeout=10)
    wait_served(stub, 2)

    change = admin_stub.Rollback(admin.RollbackRequest(reason="complaints"), metadata=OPERATOR, timeout=10)
    assert (change.from_version, change.to_version) == (2, 1)  # the previous good version
    wait_served(stub, 1)
    change = admin_stub.Rollback(admin.RollbackRequest(to_version=0, reason="back to base"), metadata=OPERATOR,
                                 timeout=10)
    assert change.to_version == 0
    wait_served(stub, 0)

    status = admin_stub.GetStatus(admin.GetStatusRequest(), timeout=10)
    assert status.serving_policy_version == 0 and status.registry_policy_version == 0
    statuses = {p.version: p.status for p in admin_stub.ListPolicies(admin.ListPoliciesRequest(), timeout=10).policies}
    assert statuses[2] == admin.POLICY_STATUS_ROLLED_BACK
    audit = [e for e in registry.audit() if e["action"] in ("promote", "rollback")]
    who = f"alice (key {ADMIN_NAME})"  # the declared operator and the admin key that acted
    assert [(e["action"], e["from"], e["to"], e["who"]) for e in reversed(audit)] == [
        ("promote", "0", "1", who), ("promote", "1", "2", who), ("rollback", "2", "1", who), ("rollback", "1", "0", who)]
    assert audit[0]["why"] == "back to base"


def test_bad_promotions_are_refused_with_the_right_code(platform):
    server, registry, admin_stub, stub = platform
    with pytest.raises(grpc.RpcError) as info:
        admin_stub.Promote(admin.PromoteRequest(version=42), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    weights = registry.path(2) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(grpc.RpcError) as info:
        admin_stub.Promote(admin.PromoteRequest(version=2), timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "corrupt" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        admin_stub.Rollback(admin.RollbackRequest(), timeout=10)  # v0 is current: nothing to roll back
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert registry.current_version() == 0 and served_version(stub) == 0


def test_status_command_shows_the_platform(platform, redis_server, capsys, monkeypatch):
    from flywheel.app.cli import main

    monkeypatch.setenv("FLYWHEEL_API_KEY", ADMIN_KEY)
    server, registry, admin_stub, stub = platform
    admin_stub.Promote(admin.PromoteRequest(version=1, reason="status"), timeout=10)
    wait_served(stub, 1)
    code = main(["status", "--grpc-address", f"127.0.0.1:{server.port}", "--redis-url", redis_server.url,
                 "--data-dir", str(registry.root_dir.parent)])
    out = capsys.readouterr().out
    assert code == 0
    assert "serving policy v1" in out and "current v1" in out
    assert re.search(r"rankings waiting\s+0\n", out)
    assert "last policy runs:" in out and "v2" in out and "candidate" in out
    assert "last reward-model runs:\n  none yet" in out


@pytest.mark.parametrize("damage", ["garbage-manifest", "manifest-not-an-object", "checksum-mismatch"])
def test_promoting_or_rolling_back_to_a_damaged_version_is_refused(platform, damage):
    from test_hot_swap import damage_version

    server, registry, admin_stub, stub = platform
    admin_stub.Promote(admin.PromoteRequest(version=1), timeout=10)
    damage_version(registry.path(2), damage)
    for call in (lambda: admin_stub.Promote(admin.PromoteRequest(version=2), timeout=10),
                 lambda: admin_stub.Rollback(admin.RollbackRequest(to_version=2), timeout=10)):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "v2 cannot be served" in info.value.details()
        assert str(registry.root_dir) not in info.value.details()  # no file paths in client messages
    assert registry.current_version() == 1
    wait_served(stub, 1)  # the server keeps serving its version
    # a damaged current version does not block rolling back away from it
    damage_version(registry.path(1), damage)
    assert admin_stub.Rollback(admin.RollbackRequest(to_version=0), timeout=10).to_version == 0
    wait_served(stub, 0)
