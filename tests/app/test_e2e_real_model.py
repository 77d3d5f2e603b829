"""End to end on the real embedded SmolLM2-135M-Instruct: `flywheel serve` in a subprocess (GGUF
converted into a fresh data directory), real gRPC requests, `flywheel complete`, clean SIGTERM."""

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flywheel.redis_server import free_port
from flywheel.v1 import feedback_pb2 as feedback_pb
from flywheel.v1 import feedback_pb2_grpc as feedback_rpc
from flywheel.v1 import inference_pb2 as pb
from flywheel.v1 import inference_pb2_grpc as rpc

from support.auth import keyed_channel

pytestmark = pytest.mark.e2e


def local_channel(port, data_dir):
    """No keys configured: the server made this machine's keys in the data directory; use its client key."""
    return keyed_channel(f"127.0.0.1:{port}", (data_dir / "secrets" / "client.key").read_text().strip())


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    port, metrics_port = free_port(), free_port()
    env = dict(os.environ, FLYWHEEL_DATA_DIR=str(data_dir), FLYWHEEL_GRPC_ADDRESS=f"127.0.0.1:{port}",
               FLYWHEEL_METRICS_PORT=str(metrics_port), FLYWHEEL_MODEL="")
    log = open(data_dir / "serve.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "flywheel.app.cli", "serve"], env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 300
    while True:
        assert process.poll() is None, (data_dir / "serve.log").read_text()
        try:
            if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                break
        except grpc.RpcError:
            pass
        assert time.monotonic() < deadline, "server did not become SERVING in 300 s"
        time.sleep(0.5)
    yield process, port, data_dir
    channel.close()
    if process.poll() is None:
        process.kill()
    log.close()


def test_real_model_answers_and_samples(served):
    process, port, data_dir = served
    assert (data_dir / "models" / "SmolLM2-135M-Instruct" / "model.safetensors").exists()
    with local_channel(port, data_dir) as channel:
        stub = rpc.InferenceStub(channel)
        greedy = stub.Complete(pb.CompleteRequest(
            messages=[pb.ChatMessage(role="user", content="What is the capital of France?")],
            max_new_tokens=24, temperature=0.0), timeout=120)
        assert "Paris" in greedy.completions[0].text
        sampled = stub.Complete(pb.CompleteRequest(
            messages=[pb.ChatMessage(role="user", content="Write one sentence about the sea.")],
            n=4, max_new_tokens=32, temperature=1.0, seed=3), timeout=120)
        assert len({c.text for c in sampled.completions}) == 4
    # the served group is rankable on the same port, from the command line too
    best_first = sorted(sampled.completions, key=lambda c: len(c.text))
    out = subprocess.run([sys.executable, "-m", "flywheel.app.cli", "rank", sampled.group_id,
                          *[c.completion_id for c in best_first], "--grpc-address", f"127.0.0.1:{port}",
                          "--data-dir", str(data_dir)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    with local_channel(port, data_dir) as channel:
        stats = feedback_rpc.FeedbackStub(channel).GetFeedbackStats(feedback_pb.GetFeedbackStatsRequest(), timeout=30)
    assert stats.human_rankings == 1 and stats.stream_length == 1


def test_complete_command_and_clean_shutdown(served):
    process, port, data_dir = served
    out = subprocess.run([sys.executable, "-m", "flywheel.app.cli", "complete", "Say hello.", "--address",
                          f"127.0.0.1:{port}", "-n", "2", "--max-new-tokens", "8", "--seed", "1",
                          "--data-dir", str(data_dir)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "#0" in out.stdout and "#1" in out.stdout and "policy v0" in out.stdout
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0
    assert not (data_dir / "redis" / "redis.url").exists(), "the embedded redis-server was not stopped"
    assert list((data_dir / "redis").rglob("appendonly*")), "no append-only file: rankings would not survive a restart"


def test_the_demo_runs_the_loop_from_a_fresh_directory(tmp_path):
    """`make demo` on a fresh machine (default relative data dir, model conversion, embedded Redis),
    with a short loop: the real model's reward model and one small PPO iteration."""
    from test_loop_e2e import run_demo

    short_loop = {"POLICY_ITERATIONS": "1", "POLICY_BATCH_SIZE": "8", "POLICY_MINI_BATCH_SIZE": "4",
                  "POLICY_PPO_EPOCHS": "1", "POLICY_RESPONSE_LENGTH": "8", "REWARD_MODEL_EPOCHS": "1",
                  "REWARD_MODEL_MIN_ACCURACY": "-1", "POLICY_HELDOUT_FRACTION": "0.5",
                  "POLICY_MIN_REWARD_GAIN": "-1000", "POLICY_KL_BUDGET": "1000000", "POLICY_PERPLEXITY_MARGIN": "1000"}
    summary, output = run_demo(tmp_path, "", short_loop, ["--rankings", "16", "--n", "2", "--max-new-tokens", "16",
                                                          "--budget-minutes", "12"], timeout=900)
    assert summary.get("outcome") == "promoted" and summary["up_exit_code"] == 0, output[-4000:]
    assert summary["metrics"]["server"]['flywheel_rankings_accepted_total{source="human"}'] == 16
    assert (tmp_path / ".flywheel" / "models" / "SmolLM2-135M-Instruct" / "model.safetensors").exists()
    assert (tmp_path / ".flywheel" / "demo" / "policies" / "v1" / "manifest.json").exists()
    assert not (tmp_path / ".flywheel" / "demo" / "redis" / "redis.url").exists(), "embedded Redis left running"
