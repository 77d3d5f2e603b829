"""Hot-swapping policy versions: the engine swap, the verified loader, the registry follower."""

import json
import threading
import time

import grpc
import pytest
import torch

from flywheel.contracts.artifacts import sha256_file
from flywheel.models import load_model
from flywheel.config import FlywheelConfig
from flywheel.redis_server import free_port
from flywheel.v1 import inference_pb2 as pb
from flywheel.v1 import inference_pb2_grpc as rpc
from serving.engine import Engine, EngineConfig, GenerationRequest, run_to_completion
from serving.policy_follower import POLICY_CHANNEL, POLICY_CURRENT_KEY
from serving.policy_loader import PolicyLoader, PolicyLoadError
from serving.sampling import SamplingParams
from serving.server import InferenceServer

from support.auth import API_KEYS, keyed_channel


def write_lora_version(policies_dir, version, base_model, seed=0, scale=0.5):
    """A policy version as the trainer writes it: a peft LoRA adapter + manifest with checksums."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(base_model).float(), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # non-zero B, so the adapter changes the outputs
                param.normal_(0, scale)
    folder = policies_dir / f"v{version}"
    folder.mkdir(parents=True)
    peft_model.save_pretrained(folder, safe_serialization=True)
    files = {p.name: sha256_file(p) for p in folder.iterdir()}
    (folder / "manifest.json").write_text(json.dumps(
        {"version": version, "kind": "policy", "status": "candidate", "format": "lora", "parent": 0,
         "files": files, "figures": {}}))
    return peft_model


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return load_model(str(tiny_model_dir), tiny_model_dir, "float32")


def greedy(tokenizer, text, n=1, tokens=8):
    return GenerationRequest(text, tokenizer(text).input_ids,
                             SamplingParams(n=n, max_new_tokens=tokens, min_new_tokens=tokens, temperature=0.0))


def test_lora_version_loads_merged_and_matches_the_adapter(base, tmp_path):
    adapter = write_lora_version(tmp_path, 1, base.model)
    loaded = PolicyLoader(base.model, tmp_path).load(1)
    ids = base.tokenizer("check the merge", return_tensors="pt").input_ids
    with torch.inference_mode():
        expected = adapter(ids).logits
        merged = loaded.model(ids).logits
        original = base.model(ids).logits
    assert loaded.version == 1
    assert torch.allclose(merged, expected, atol=1e-4)
    assert not torch.allclose(merged, original, atol=1e-2), "the adapter should change the policy"
    assert torch.equal(base.model(ids).logits, original), "the base model must stay untouched"


def damage_version(folder, damage):
    """Break a written version the way a bad disk, a killed copy or a careless hand would."""
    weights = folder / "adapter_model.safetensors"
    manifest = folder / "manifest.json"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "no-manifest":
        manifest.unlink()
    elif damage == "garbage-manifest":
        manifest.write_bytes(b"\x00{not json\xff")
    elif damage == "manifest-not-an-object":
        manifest.write_text("[1, 2, 3]")
    elif damage == "checksum-mismatch":
        data = json.loads(manifest.read_text())
        data["files"]["adapter_model.safetensors"] = "0" * 64
        manifest.write_text(json.dumps(data))
    else:
        weights.unlink()


DAMAGES = ["truncate", "flip", "no-manifest", "missing-file", "garbage-manifest", "manifest-not-an-object",
           "checksum-mismatch"]


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_versions_are_refused(base, tmp_path, damage):
    write_lora_version(tmp_path, 2, base.model)
    damage_version(tmp_path / "v2", damage)
    with pytest.raises(PolicyLoadError) as info:
        PolicyLoader(base.model, tmp_path).load(2)
    assert "v2" in str(info.value)


def test_engine_swap_lets_in_flight_requests_finish_on_their_version(base, tmp_path):
    write_lora_version(tmp_path, 1, base.model)
    new = PolicyLoader(base.model, tmp_path).load(1)
    engine = Engine(base.model, base.tokenizer, EngineConfig(max_batch_sequences=16))
    engine.start()
    try:
        old_alone = run_to_completion(engine, greedy(base.tokenizer, "in flight", tokens=60), timeout=60)
        in_flight = engine.submit(greedy(base.tokenizer, "in flight", tokens=60))
        while engine.running_sequences == 0:
            time.sleep(0.005)
        engine.swap(new.model, 1).wait(10)
        after = run_to_completion(engine, greedy(base.tokenizer, "after", tokens=8), timeout=60)
        finished = run_to_completion_of(in_flight)
    finally:
        engine.stop()
    assert finished.policy_version == 0
    assert finished.samples[0].token_ids == old_alone.samples[0].token_ids  # no token from the new model
    assert after.policy_version == 1 and engine.policy_version == 1
    ids = torch.tensor([base.tokenizer("after").input_ids])
    with torch.inference_mode():
        expected = new.model.generate(ids, do_sample=False, max_new_tokens=8, min_new_tokens=8,
                                      pad_token_id=base.tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    assert after.samples[0].token_ids == expected


def run_to_completion_of(request):
    from serving.engine import DoneEvent, iter_events

    return next(e for e in iter_events(request) if isinstance(e, DoneEvent)).result


@pytest.fixture
def followed_server(tiny_model_dir, tmp_path, redis_client, base):
    settings = FlywheelConfig.load({"model": str(tiny_model_dir), "grpc_address": "127.0.0.1:0", "metrics_port": 0,
                              "dtype": "float32", "data_dir": str(tmp_path), "policy_poll_seconds": 0.5,
                              "api_keys": API_KEYS},
                             environ={})
    for version in (1, 2):
        write_lora_version(tmp_path / "policies", version, base.model, seed=version)
    redis_client.set(POLICY_CURRENT_KEY, 0)  # versions on disk: an absent pointer would mean a lost one
    server = InferenceServer(settings, policy_redis=redis_client).start(wait_until_ready=True)
    yield server, tmp_path / "policies"
    server.stop(grace=1)


def set_pointer(client, version):
    client.set(POLICY_CURRENT_KEY, version)
    client.publish(POLICY_CHANNEL, json.dumps({"action": "promote", "to": str(version)}))


def wait_for_version(server, version, timeout=20):
    deadline = time.monotonic() + timeout
    while server.engine.policy_version != version:
        assert time.monotonic() < deadline, f"server still on v{server.engine.policy_version}, wanted v{version}"
        time.sleep(0.02)


def test_server_follows_the_pointer_and_refuses_a_corrupt_version(followed_server, redis_client):
    server, policies = followed_server
    stub = rpc.InferenceStub(keyed_channel(f"127.0.0.1:{server.port}"))
    assert stub.Complete(pb.CompleteRequest(prompt="v?", max_new_tokens=2), timeout=30).policy_version == 0
    set_pointer(redis_client, 1)
    wait_for_version(server, 1)
    assert stub.Complete(pb.CompleteRequest(prompt="v?", max_new_tokens=2), timeout=30).policy_version == 1
    # a corrupt v2 is refused; v1 keeps serving
    weights = policies / "v2" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-50])
    set_pointer(redis_client, 2)
    deadline = time.monotonic() + 10
    while server.metrics.policy_load_failures._value.get() < 1:
        assert time.monotonic() < deadline, "the corrupt version was not refused"
        time.sleep(0.05)
    assert stub.Complete(pb.CompleteRequest(prompt="v?", max_new_tokens=2), timeout=30).policy_version == 1
    # back to the base model
    set_pointer(redis_client, 0)
    wait_for_version(server, 0)
    assert stub.Complete(pb.CompleteRequest(prompt="v?", max_new_tokens=2), timeout=30).policy_version == 0


def test_the_poll_catches_a_pointer_change_without_a_message(followed_server, redis_client):
    server, _ = followed_server
    redis_client.set(POLICY_CURRENT_KEY, 2)  # no PUBLISH
    wait_for_version(server, 2, timeout=10)


def test_promote_rollback_cycles_under_load_fail_no_request(followed_server, redis_client):
    server, _ = followed_server
    channel = keyed_channel(f"127.0.0.1:{server.port}")
    stub = rpc.InferenceStub(channel)
    stop = threading.Event()
    seen, errors = [], []

    def client(i):
        while not stop.is_set():
            try:
                response = stub.Complete(pb.CompleteRequest(prompt=f"load {i}", n=2, max_new_tokens=6), timeout=60)
                seen.append((time.monotonic(), response.policy_version))
            except grpc.RpcError as exc:
                errors.append(exc.code())

    clients = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in clients:
        t.start()
    try:
        for cycle in range(10):
            target = 1 if cycle % 2 == 0 else 0  # promote v1, roll back to v0
            set_pointer(redis_client, target)
            wait_for_version(server, target)
            settled = time.monotonic()
            while not any(v == target and t > settled for t, v in seen):  # a completion from the new version
                assert time.monotonic() - settled < 30, f"no completion from v{target} after the swap"
                time.sleep(0.05)
    finally:
        stop.set()
        for t in clients:
            t.join(60)
    assert errors == []
    assert len(seen) > 20
    assert {v for _, v in seen} == {0, 1}
