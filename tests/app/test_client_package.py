"""flywheel-client (clients/python): built as a wheel from the platform's sources, installed into a
fresh virtual environment that holds only it, grpcio and protobuf (and typing-extensions, which grpcio
requires; no torch, transformers, redis), and used there to call a real server."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from support.auth import CLIENT_KEY

ROOT = Path(__file__).resolve().parents[2]
CLIENT_DIR = ROOT / "clients" / "python"
BLOCKED = ("torch", "transformers", "redis", "celery", "numpy", "safetensors", "serving", "feedback", "training")

CLIENT_PROGRAM = r"""
import importlib.abc, json, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"the client must not import {name}")
        return None

sys.meta_path.insert(0, Blocked())
import grpc
import flywheel
from flywheel.grpc_client import CHANNEL_OPTIONS, with_key
from flywheel.v1 import inference_pb2, inference_pb2_grpc

channel = with_key(grpc.insecure_channel(sys.argv[1], options=CHANNEL_OPTIONS), sys.argv[2])
response = inference_pb2_grpc.InferenceStub(channel).Complete(
    inference_pb2.CompleteRequest(prompt="Hello", n=2, max_new_tokens=4, seed=1), timeout=120)
try:
    inference_pb2_grpc.InferenceStub(with_key(grpc.insecure_channel(sys.argv[1]), "wrong")).Complete(
        inference_pb2.CompleteRequest(prompt="Hello", max_new_tokens=1), timeout=60)
    refused = ""
except grpc.RpcError as error:
    refused = error.code().name
print(json.dumps({"flywheel": flywheel.__file__, "group_id": response.group_id, "refused": refused,
                  "samples": len(response.completions), "modules": sorted(sys.modules)}))
""".replace("BLOCKED", repr(BLOCKED))


def site_packages_of(*distributions: str) -> list[Path]:
    """The files of installed distributions and of everything they require (their top-level
    folders and dist-info), to link into the fresh environment: what `pip install` of them would
    have put there."""
    from importlib.metadata import distribution

    site = Path(sysconfig.get_paths()["purelib"])
    found, seen, todo = set(), set(), list(distributions)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        installed = distribution(name)
        for file in installed.files or ():
            top = Path(file).parts[0]
            if not top.endswith(".pth") and top != "..":
                found.add(site / top)
        for requirement in installed.requires or ():
            if "extra ==" not in requirement:
                todo.append(re.match(r"\s*([A-Za-z0-9_.-]+)", requirement).group(1))
    return sorted(found)


@pytest.fixture(scope="module")
def client_wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    leftovers = [CLIENT_DIR / "build", ROOT / "flywheel_client.egg-info"]
    existed = {p for p in leftovers if p.exists()}
    try:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                        str(CLIENT_DIR)], check=True, cwd=ROOT, timeout=300)
    finally:
        for path in leftovers:
            if path not in existed:
                shutil.rmtree(path, ignore_errors=True)
    (wheel,) = out.glob("flywheel_client-*.whl")
    return wheel


def test_the_wheel_holds_only_the_client_and_needs_only_grpc(client_wheel):
    with zipfile.ZipFile(client_wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith("METADATA"))).decode()
    modules = sorted(n for n in names if n.endswith(".py"))
    assert modules == sorted(["flywheel/__init__.py", "flywheel/api_keys.py", "flywheel/grpc_client.py",
                              "flywheel/tls.py", "flywheel/v1/__init__.py"]
                             + [f"flywheel/v1/{s}_pb2{g}.py" for s in ("admin", "feedback", "inference")
                                for g in ("", "_grpc")])
    requires = sorted(re.match(r"\s*([A-Za-z0-9_.-]+)", line.split(":", 1)[1]).group(1)
                      for line in metadata.splitlines() if line.startswith("Requires-Dist:"))
    assert requires == ["grpcio", "protobuf"]


def test_a_fresh_environment_with_only_the_client_calls_a_real_server(client_wheel, tiny_server, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # install: the wheel into the fresh site-packages (pip, from this environment, offline), and its
    # dependencies (grpcio, protobuf and what they require) as pip would have placed them
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
                    str(client_wheel)], check=True, timeout=300)
    for path in site_packages_of("grpcio", "protobuf"):
        target = site / path.name
        if not target.exists():
            target.symlink_to(path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    ran = subprocess.run([str(python), "-I", "-c", CLIENT_PROGRAM, f"127.0.0.1:{tiny_server.port}", CLIENT_KEY], env=env,
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    result = json.loads(ran.stdout)
    assert result["flywheel"].startswith(str(site))  # the installed client, not this checkout
    assert result["samples"] == 2 and len(result["group_id"]) == 32
    assert result["refused"] == "UNAUTHENTICATED"
    assert not [m for m in result["modules"] if m.split(".")[0] in BLOCKED]
    assert not (site / "torch").exists() and not (site / "redis").exists()
