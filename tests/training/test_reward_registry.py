"""The generic version registry: atomic versions on disk, statuses, the current pointer, the audit
stream, pub/sub, and a rebuild from the manifests."""

from __future__ import annotations

import json

import pytest

from flywheel.contracts.artifacts import POLICY_KIND, REWARD_MODEL_KIND
from flywheel.contracts.keys import registry_channel
from flywheel.registry import CURRENT, REJECTED, ROLLED_BACK, SUPERSEDED, VersionRegistry, open_registry


def write(registry, parent=None, figures=None):
    return registry.write_version(lambda folder: (folder / "model.safetensors").write_bytes(b"weights"),
                                  {"parent": parent, "figures": figures or {}})


def test_versions_start_at_1_and_promotion_moves_the_pointer_and_is_published(redis_client, tmp_path):
    registry = open_registry(redis_client, tmp_path, REWARD_MODEL_KIND)
    pubsub = redis_client.pubsub()
    pubsub.subscribe(registry_channel(REWARD_MODEL_KIND))
    pubsub.get_message(timeout=1)
    assert registry.current_version() == 0
    v1 = write(registry)
    assert v1.version == 1 and v1.status == "candidate"
    registry.promote(1, "test", "first")
    v2 = write(registry, parent=1)
    registry.promote(2, "test", "better")
    assert registry.current_version() == 2
    assert registry.get(1).status == SUPERSEDED and registry.get(2).status == CURRENT
    assert json.loads((tmp_path / "reward_models" / "v2" / "manifest.json").read_text())["status"] == CURRENT
    messages = [pubsub.get_message(timeout=1) for _ in range(4)]
    events = [json.loads(m["data"]) for m in messages if m and m["type"] == "message"]
    assert [e["action"] for e in events][-1] == "promote" and events[-1]["from"] == "1" and events[-1]["to"] == "2"
    audit = registry.audit()
    assert audit[0]["action"] == "promote" and audit[0]["who"] == "test" and audit[0]["why"] == "better"
    assert v2.parent == 1


def test_rejected_and_rolled_back_versions_keep_their_figures(redis_client, tmp_path):
    registry = VersionRegistry(redis_client, POLICY_KIND, tmp_path / "policys")
    write(registry)
    registry.promote(1, "t", "first")
    write(registry, parent=1, figures={"heldout_accuracy": 0.5})
    registry.reject(2, "t", "worse")
    assert registry.current_version() == 1
    assert registry.get(2).status == REJECTED and registry.get(2).figures["heldout_accuracy"] == 0.5
    write(registry, parent=1)
    registry.promote(3, "t", "ok")
    registry.rollback(1, "operator", "bad outputs")
    assert registry.current_version() == 1 and registry.get(3).status == ROLLED_BACK
    with pytest.raises(ValueError):
        registry.rollback(42, "operator", "no such version")


def test_a_writer_that_dies_midway_leaves_no_version(redis_client, tmp_path):
    registry = VersionRegistry(redis_client, REWARD_MODEL_KIND, tmp_path / "rm")

    def dies(folder):
        (folder / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        registry.write_version(dies, {})
    assert registry.versions() == []
    assert not any(p.name.startswith("v") for p in (tmp_path / "rm").iterdir())
    assert write(registry).version == 2  # numbers are never reused


def test_the_registry_is_rebuilt_from_the_manifests_on_disk(redis_client, tmp_path):
    registry = VersionRegistry(redis_client, REWARD_MODEL_KIND, tmp_path / "rm")
    for _ in range(3):
        write(registry)
    registry.promote(2, "t", "x")
    registry.reject(3, "t", "y")
    (tmp_path / "rm" / ".tmp-v4-abc").mkdir()  # a killed writer's leftover
    redis_client.flushall()
    assert registry.versions() == []
    assert registry.rebuild_from_disk() == 3
    assert registry.current_version() == 2
    assert [r.status for r in registry.versions()] == ["candidate", CURRENT, REJECTED]
    assert not (tmp_path / "rm" / ".tmp-v4-abc").exists()
    assert write(registry).version == 4
