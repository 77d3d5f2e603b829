"""A failure inside the engine, against a real ``flywheel serve`` process (issue 12, item 10).

The server runs with the test-only fault hook (``serving.engine.FAULTS_ENV``): a prompt carrying a
fault marker fails in the stage it names. One failed prefill or decode step fails only the
request(s) in it, with ABORTED and a message (never INTERNAL, never a hang to the deadline), while
a stream decoding beside it finishes and later requests are served; a failure of the engine loop
itself turns health NOT_SERVING and the process exits non-zero, so a supervisor restarts it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flywheel.app.serve import ENGINE_FAILED_EXIT
from flywheel.v1 import inference_pb2 as pb
from flywheel.v1 import inference_pb2_grpc as rpc
from serving.engine import FAULTS_ENV
from support.auth import API_KEYS, keyed_channel
from test_server import free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def serve(tiny_model_dir, tmp_path):
    processes = []

    def start(faults: bool = True):
        port = free_port()
        env = dict(os.environ, FLYWHEEL_DATA_DIR=str(tmp_path), FLYWHEEL_GRPC_ADDRESS=f"127.0.0.1:{port}",
                   FLYWHEEL_METRICS_PORT="0", FLYWHEEL_MODEL=str(tiny_model_dir), FLYWHEEL_DTYPE="float32",
                   FLYWHEEL_STORE_GROUPS="false", FLYWHEEL_API_KEYS=API_KEYS, FLYWHEEL_TORCH_THREADS="1")
        if faults:
            env[FAULTS_ENV] = "1"
        log = open(tmp_path / f"serve-{port}.log", "w")
        process = subprocess.Popen([sys.executable, "-m", "flywheel.app.cli", "serve"], env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
        processes.append((process, log))
        process.log_path = tmp_path / f"serve-{port}.log"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 120
            while True:
                assert process.poll() is None, process.log_path.read_text()
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == SERVING:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, "the server did not become SERVING"
                time.sleep(0.2)
        return process, port

    yield start
    for process, log in processes:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        log.close()


def request(prompt: str, tokens: int = 8, **kw) -> pb.CompleteRequest:
    return pb.CompleteRequest(prompt=prompt, max_new_tokens=tokens, min_new_tokens=tokens, temperature=0.0, **kw)


def test_a_failed_prefill_or_step_fails_only_its_request(serve):
    process, port = serve()
    with keyed_channel(f"127.0.0.1:{port}") as channel:
        stub = rpc.InferenceStub(channel)
        # a long stream decodes while the faulty request is prefilled beside it
        stream = stub.StreamComplete(request("a healthy neighbour", tokens=200), timeout=120)
        first = next(stream)
        assert first.HasField("delta")
        with pytest.raises(grpc.RpcError) as failed:
            stub.Complete(request("boom <<flywheel-fault:prefill>>"), timeout=30)
        assert failed.value.code() == grpc.StatusCode.ABORTED, failed.value.details()
        assert "prefill" in failed.value.details() and "retrying" in failed.value.details()
        final = [m for m in stream if m.HasField("final")]
        assert final and final[0].final.completions[0].token_count == 200  # the neighbour was not touched

        with pytest.raises(grpc.RpcError) as failed:
            stub.Complete(request("boom <<flywheel-fault:decode>>"), timeout=30)
        assert failed.value.code() == grpc.StatusCode.ABORTED, failed.value.details()
        assert "decode step" in failed.value.details()

        # the engine goes on: later requests are answered, health stays SERVING
        for _ in range(3):
            assert stub.Complete(request("after the faults"), timeout=30).completions[0].token_count == 8
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == SERVING
    assert process.poll() is None


def test_an_engine_that_cannot_go_on_turns_not_serving_and_exits_non_zero(serve):
    process, port = serve()
    statuses: list[int] = []
    watching = threading.Event()

    def watch():
        with grpc.insecure_channel(f"127.0.0.1:{port}") as bare:
            try:
                for reply in health_pb2_grpc.HealthStub(bare).Watch(health_pb2.HealthCheckRequest(), timeout=60):
                    statuses.append(reply.status)
                    watching.set()
            except grpc.RpcError:
                pass  # the server went away after saying NOT_SERVING

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert watching.wait(10)
    with keyed_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.RpcError) as failed:
            rpc.InferenceStub(channel).Complete(request("<<flywheel-fault:fatal>>"), timeout=30)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
    assert "restarting" in failed.value.details()
    assert process.wait(30) == ENGINE_FAILED_EXIT, process.log_path.read_text()[-3000:]
    watcher.join(10)
    assert statuses[0] == SERVING and NOT_SERVING in statuses, statuses
    assert "engine failed and cannot go on" in process.log_path.read_text()


def test_the_fault_hook_is_off_unless_its_variable_is_set(serve):
    process, port = serve(faults=False)
    with keyed_channel(f"127.0.0.1:{port}") as channel:
        reply = rpc.InferenceStub(channel).Complete(request("<<flywheel-fault:fatal>>"), timeout=30)
    assert reply.completions[0].token_count == 8
    assert process.poll() is None
