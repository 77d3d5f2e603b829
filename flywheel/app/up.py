"""``flywheel up``: the whole platform on one machine, under one Ctrl-C.

It starts (or finds) the embedded Redis of the data directory unless ``REDIS_URL`` is given, then
the processes a deployment runs separately: the gRPC server (Inference, Feedback, Admin on one
port), a labelling worker and a training worker (Celery, each with its own ``/metrics``), and
Celery beat for the labelling schedule. The loop then moves by itself: rankings arrive through
the Feedback API, the training worker's trigger starts a reward-model run after enough of them,
a promoted reward model starts a PPO run, a promoted policy reaches the server through the
registry. Each process logs to ``data_dir/logs/NAME.log``. Ctrl-C (or SIGTERM) stops them all
cleanly; a second start resumes from the data directory (Redis AOF, registries, artifacts).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from flywheel.api_keys import KeyStore
from flywheel.app.tables import format_table, plain_text
from flywheel.config import (ENV_PREFIX, FlywheelConfig, LabellingWorkerConfig, SecurityConfig, ServingConfig,
                             TrainingWorkerConfig, add_config_flags, config_from_args)

log = logging.getLogger(__name__)

@dataclass
class Process:
    name: str
    command: list[str]
    popen: subprocess.Popen | None = None

    def start(self, env: dict, logs: Path) -> None:
        log_file = open(logs / f"{self.name}.log", "ab")
        self.popen = subprocess.Popen(self.command, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        log_file.close()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float) -> None:
        if not self.alive():
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s; killing it", self.name, timeout)
            self.popen.kill()
            self.popen.wait()


def platform_processes(settings: FlywheelConfig) -> list[Process]:
    python = sys.executable
    celery = [python, "-m", "celery", "-A", "flywheel.app.worker"]
    schedule = str(Path(settings.data_dir) / "celerybeat-schedule")
    return [
        Process("server", [python, "-m", "flywheel.app.cli", "serve"]),
        Process("labelling-worker", celery + ["worker", "-Q", "labelling", "--pool", "solo", "-c", "1",
                                              "-n", "labelling@%h", "--loglevel", "INFO"]),
        Process("training-worker", celery + ["worker", "-Q", "training", "--pool", "solo", "-c", "1",
                                             "-n", "training@%h", "--loglevel", "INFO"]),
        Process("beat", celery + ["beat", "--schedule", schedule, "--loglevel", "INFO"]),
    ]


def child_environment(settings: FlywheelConfig, redis_url: str) -> dict:
    """Every child gets the same settings (as FLYWHEEL_* variables) and Redis."""
    env = dict(os.environ) | settings.environment()
    env[ENV_PREFIX + "DATA_DIR"] = str(Path(settings.data_dir).resolve())
    env[ENV_PREFIX + "REDIS_URL"] = redis_url
    env["REDIS_URL"] = redis_url  # the Celery broker
    return env


def run_up(args: argparse.Namespace) -> int:
    from flywheel.redis_server import EmbeddedRedisOptions, redacted, resolve_redis_url

    settings = config_from_args(args)
    data_dir = Path(settings.data_dir).resolve()
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # the embedded server's password travels in the children's environment, never in argv or a log
    redis_url, embedded = resolve_redis_url(settings.redis_url, data_dir, embedded=EmbeddedRedisOptions.of(settings))
    if settings.security.auth != "off":  # the machine's API keys exist (and are logged) before any client needs them
        KeyStore.from_settings(dataclasses.replace(settings, data_dir=data_dir))
    processes = platform_processes(settings)
    env = child_environment(settings, redis_url)
    stopping = threading.Event()

    def request_stop(signum, frame) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    exit_code = 0
    try:
        for process in processes:
            process.start(env, logs)
        print(format_table(("process", "pid", "where", "log"), [
            ("redis", "-" if embedded is None else str(embedded.process.pid), redacted(redis_url), ""),
            *[(p.name, str(p.popen.pid), _where(p.name, settings), str(logs / f"{p.name}.log")) for p in processes],
        ]), flush=True)
        print("flywheel up: running; Ctrl-C stops everything", flush=True)
        while not stopping.wait(1.0):
            dead = [p for p in processes if not p.alive()]
            if dead:
                for p in dead:
                    print(f"flywheel up: {p.name} exited with code {p.popen.returncode}; see "
                          f"{logs / (p.name + '.log')}. Stopping the platform.", file=sys.stderr, flush=True)
                exit_code = 1
                break
    finally:
        print("flywheel up: stopping (in-flight requests and tasks get time to finish)", flush=True)
        for process in reversed(processes):
            process.stop(timeout=30)
        if embedded is not None:
            embedded.stop()
    return exit_code


def _where(name: str, settings: FlywheelConfig) -> str:
    if name == "server":
        http = f", HTTP :{settings.serving.http_port}" if settings.serving.http_port else ""
        return f"gRPC {settings.grpc_address}{http}, metrics :{settings.serving.metrics_port}"
    if name == "labelling-worker":
        return f"queue labelling, metrics :{settings.labelling.metrics_port}"
    if name == "training-worker":
        return f"queue training, metrics :{settings.training.metrics_port}"
    return "labelling schedule"


def register(subparsers) -> None:
    up = subparsers.add_parser("up", help="run the whole platform on this machine (Ctrl-C stops it)",
                               description=plain_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(up, FlywheelConfig, ServingConfig, SecurityConfig, LabellingWorkerConfig, TrainingWorkerConfig)
    up.set_defaults(handler=run_up)
