"""`flywheel up` runs the platform's processes under one Ctrl-C (tiny model, real processes)."""

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flywheel.redis_server import free_port
from flywheel.v1 import feedback_pb2, feedback_pb2_grpc
from flywheel.v1 import inference_pb2 as pb
from flywheel.v1 import inference_pb2_grpc as rpc

from support.auth import keyed_channel


def wait_for(check, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except Exception:
            pass
        assert time.monotonic() < deadline, f"{what} not ready after {timeout} s"
        time.sleep(0.5)


def metrics_up(port):
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).status == 200


def test_up_starts_every_process_and_ctrl_c_stops_them(tiny_model_dir, tmp_path):
    port, metrics, labelling, training = (free_port() for _ in range(4))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_") and k != "REDIS_URL"}
    env.update(FLYWHEEL_MODEL=str(tiny_model_dir), FLYWHEEL_DTYPE="float32",
               FLYWHEEL_REWARD_MODEL_BACKBONE=str(tiny_model_dir))
    up = subprocess.Popen([sys.executable, "-m", "flywheel.app.cli", "up", "--data-dir", str(tmp_path),
                           "--grpc-address", f"127.0.0.1:{port}", "--metrics-port", str(metrics),
                           "--labelling-metrics-port", str(labelling), "--training-metrics-port", str(training)],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)
        wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=2).status ==
                 health_pb2.HealthCheckResponse.SERVING, 120, "the server")
        # no keys configured: the platform made this machine's keys, and clients find them there
        secrets = tmp_path / "secrets"
        assert (secrets / "client.key").stat().st_mode & 0o077 == 0
        client_key = (secrets / "client.key").read_text().strip()
        assert client_key not in (secrets / "api_keys.json").read_text()
        channel.close()
        channel = keyed_channel(f"127.0.0.1:{port}", client_key)
        for name, metrics_port in (("server", metrics), ("labelling worker", labelling),
                                   ("training worker", training)):
            wait_for(lambda: metrics_up(metrics_port), 120, f"the {name}'s /metrics")
        response = rpc.InferenceStub(channel).Complete(pb.CompleteRequest(prompt="hi", n=2, max_new_tokens=4),
                                                       timeout=30)
        ack = feedback_pb2_grpc.FeedbackStub(channel).SubmitRanking(feedback_pb2.SubmitRankingRequest(
            group_id=response.group_id, completion_ids=[c.completion_id for c in response.completions]), timeout=30)
        assert ack.stream_entry_id
        channel.close()
        # the embedded Redis takes only clients with the password in DATA_DIR/secrets: the server, both
        # workers (their /metrics read it: 2048 MiB, the default bound), beat and the CLI have it
        password = (secrets / "redis.password").read_text().strip()
        assert (secrets / "redis.password").stat().st_mode & 0o077 == 0
        marker = (tmp_path / "redis" / "redis.url").read_text().strip()
        assert password not in marker
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(marker).ping()
        for metrics_port in (metrics, labelling):
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
            bound = re.search(r"^flywheel_redis_memory_max_bytes (\S+)$", text, re.M)
            assert bound and float(bound.group(1)) == 2048 * 2**20, metrics_port
        listing = subprocess.run([sys.executable, "-m", "flywheel.app.cli", "policies", "--data-dir", str(tmp_path)],
                                 env=env, capture_output=True, text=True, timeout=120)
        assert listing.returncode == 0, listing.stderr
        for name in ("server", "labelling-worker", "training-worker", "beat"):
            assert (tmp_path / "logs" / f"{name}.log").exists()
    finally:
        up.send_signal(signal.SIGINT)
        output, _ = up.communicate(timeout=120)
    assert up.returncode == 0, output[-3000:]
    assert password not in output  # the table shows the Redis URL redacted
    assert "stopping" in output
    assert not (tmp_path / "redis" / "redis.url").exists(), "the embedded redis-server was left running"
    for port_ in (port, metrics, labelling, training):  # every process is gone
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port_}/metrics", timeout=1)
            raise AssertionError(f"something still answers on port {port_}")
        except OSError:
            pass
