"""Hot-swap under load: time from ``Admin.Promote`` to the first completion served by the new version.

A real serving process (in this process: gRPC server, embedded redis-server, the embedded
SmolLM2-135M-Instruct) serves a steady load from concurrent clients; a LoRA policy version (as a
PPO run writes it: rank 16 on the top 8 layers) is promoted through the Admin API, then rolled
back, several times. For each change it reports the time until the engine serves the new version
(pub/sub + verify + merge + step boundary) and until the first completion that the new version
produced arrives, and it counts failed requests (there must be none). Medians are printed.

    python bench/swap.py [--clients 8] [--cycles 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flywheel.contracts.artifacts import POLICY_FORMAT_LORA, POLICY_KIND, sha256_file  # noqa: E402
from flywheel.models import load_model  # noqa: E402
from flywheel.registry import VersionRegistry, open_registry  # noqa: E402
from flywheel.config import FlywheelConfig  # noqa: E402
from flywheel.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc  # noqa: E402
from flywheel.api_keys import generate_key  # noqa: E402
from flywheel.grpc_client import with_key  # noqa: E402
from flywheel.app.serve import build_server  # noqa: E402


def write_version(registry: VersionRegistry, base: torch.nn.Module) -> int:
    from peft import LoraConfig, get_peft_model

    layers = base.config.num_hidden_layers
    adapter = get_peft_model(copy.deepcopy(base).float(), LoraConfig(
        r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"], layers_to_transform=list(range(layers - 8, layers))))
    manifest = {"format": POLICY_FORMAT_LORA, "parent": 0, "reward_model_version": 0, "figures": {}}

    def write(folder: Path) -> None:
        adapter.save_pretrained(folder, safe_serialization=True)
        manifest["files"] = {p.name: sha256_file(p) for p in folder.iterdir()}

    return registry.write_version(write, manifest).version


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--data-dir", default=str(ROOT / ".flywheel"))
    args = parser.parse_args()
    models = Path(args.data_dir).resolve() / "models"
    base = load_model("", Path(args.data_dir)).model  # converts the GGUF once if needed

    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "models").symlink_to(models)
        key = generate_key()
        settings = FlywheelConfig.load({"data_dir": scratch, "grpc_address": "127.0.0.1:0", "metrics_port": 0,
                                  "policy_poll_seconds": 5.0, "api_keys": f"bench:admin:{key}",
                                  "admin_requests_per_second": 0}, environ={})
        server, release = build_server(settings)
        server.start(wait_until_ready=True)
        registry = open_registry(server.policy_redis, scratch, POLICY_KIND)
        version = write_version(registry, base)
        channel = with_key(grpc.insecure_channel(f"127.0.0.1:{server.port}"), key)
        stub = inference_pb2_grpc.InferenceStub(channel)
        admin = admin_pb2_grpc.AdminStub(channel)
        stop = threading.Event()
        completions: list[tuple[float, int]] = []
        errors: list[str] = []

        def client(i: int) -> None:
            while not stop.is_set():
                try:
                    r = stub.Complete(inference_pb2.CompleteRequest(
                        messages=[inference_pb2.ChatMessage(role="user", content=f"Say something nice #{i}.")],
                        n=2, max_new_tokens=32), timeout=120)
                    completions.append((time.monotonic(), r.policy_version))
                except grpc.RpcError as exc:
                    errors.append(exc.code().name)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        time.sleep(5)  # steady load first
        to_engine, to_completion = [], []
        try:
            for cycle in range(args.cycles):
                for target in (version, 0):
                    started = time.monotonic()
                    if target:
                        admin.Promote(admin_pb2.PromoteRequest(version=target, reason="bench"), timeout=30)
                    else:
                        admin.Rollback(admin_pb2.RollbackRequest(to_version=0, reason="bench"), timeout=30)
                    while server.engine.policy_version != target:
                        time.sleep(0.005)
                    to_engine.append(time.monotonic() - started)
                    while not any(t > started and v == target for t, v in completions):
                        time.sleep(0.005)
                    first = min(t for t, v in completions if t > started and v == target)
                    to_completion.append(first - started)
                    print(f"cycle {cycle}: -> v{target}: engine swapped after {to_engine[-1]:.2f} s, first completion "
                          f"from v{target} after {to_completion[-1]:.2f} s", flush=True)
                    time.sleep(2)
        finally:
            stop.set()
            for t in threads:
                t.join(120)
            channel.close()
            server.stop(grace=5)
            release()
    print(f"{len(completions)} completions under load from {args.clients} clients, {len(errors)} failed {errors[:3]}")
    print(f"promotion/rollback -> engine on the new version: median {statistics.median(to_engine):.2f} s")
    print(f"promotion/rollback -> first completion by the new version: median {statistics.median(to_completion):.2f} s")


if __name__ == "__main__":
    main()
