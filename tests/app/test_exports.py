"""`flywheel feedback export` and `flywheel policies export` on a real Redis and a tiny model."""

from __future__ import annotations

import json
import time

import pytest
import torch

from flywheel.app.cli import main as flywheel_main
from flywheel.contracts.keys import RANKINGS_STREAM, group_key
from flywheel.contracts.artifacts import POLICY_FORMAT_LORA, POLICY_KIND, REWARD_MODEL_KIND
from flywheel.contracts.rankings import SOURCE_AI, SOURCE_HUMAN, RankingEntry
from flywheel.group_store import GroupStore
from flywheel.rankings_stream import RankingStream
from flywheel.registry import open_registry

from support.feedback import PROMPT, group_result


def cli(redis_server, data_dir, *argv) -> int:
    return flywheel_main([*argv, "--redis-url", redis_server.url, "--data-dir", str(data_dir)])


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def rankings(redis_client):
    """Four served groups: one ranked 3-way by a person, one pairwise by the AI labeler (an hour
    later), one whose group record expired after its ranking (the entry carries a copy), and one
    ranked before entries carried copies, its group expired (no texts left anywhere)."""
    groups = GroupStore(redis_client, 3600)
    stream = RankingStream(redis_client, group_ttl_seconds=3600)
    groups.save(group_result("g1", ["best", "middle", "worst"], policy_version=2))
    groups.save(group_result("g2", ["yes", "no"], policy_version=3))
    groups.save(group_result("g3", ["a", "b"]))
    now = time.time()
    stream.append(RankingEntry("g1", ["g1-0", "g1-1", "g1-2"], SOURCE_HUMAN, 2, annotator_id="ann", comment="ok",
                               created_at=now - 3600))
    stream.append(RankingEntry("g2", ["g2-1", "g2-0"], SOURCE_AI, 3, annotator_id="ai:judge", judge_id="judge-1",
                               pair_probabilities=[("g2-1", "g2-0", 0.8)], confidence=0.6, created_at=now))
    stream.append(RankingEntry("g3", ["g3-0", "g3-1"], SOURCE_HUMAN, 0, annotator_id="ann", created_at=now))
    redis_client.delete(group_key("g3"))  # expired after the ranking: the entry's copy remains
    redis_client.xadd(RANKINGS_STREAM, RankingEntry("g4", ["g4-0", "g4-1"], SOURCE_HUMAN, 0, annotator_id="ann",
                                                    created_at=now).to_fields())  # no copy, no group
    return now


def test_pairwise_export_is_trls_preference_format(redis_server, tmp_path, rankings, capsys):
    out = tmp_path / "pairs.jsonl"
    assert cli(redis_server, tmp_path, "feedback", "export", str(out)) == 0
    records = read_jsonl(out)
    assert records == [
        {"prompt": PROMPT, "chosen": "best", "rejected": "middle"},
        {"prompt": PROMPT, "chosen": "best", "rejected": "worst"},
        {"prompt": PROMPT, "chosen": "middle", "rejected": "worst"},
        {"prompt": PROMPT, "chosen": "no", "rejected": "yes"},
        {"prompt": PROMPT, "chosen": "a", "rejected": "b"},  # from the entry's copy of the expired group
    ]
    assert "skipped: 1 group expired" in capsys.readouterr().err


def test_kway_export_keeps_source_annotator_and_policy_version(redis_server, tmp_path, rankings):
    out = tmp_path / "kway.jsonl"
    assert cli(redis_server, tmp_path, "feedback", "export", str(out), "--format", "kway") == 0
    human, ai, expired = read_jsonl(out)
    assert human["completions"] == ["best", "middle", "worst"] and human["completion_ids"] == ["g1-0", "g1-1", "g1-2"]
    assert (human["source"], human["annotator_id"], human["policy_version"], human["comment"]) == ("human", "ann", 2,
                                                                                                  "ok")
    assert (ai["source"], ai["judge_id"], ai["policy_version"]) == ("ai", "judge-1", 3)
    assert human["prompt"] == PROMPT and human["stream_entry_id"] and human["sampling"]["n"] == 3
    assert (expired["group_id"], expired["completions"]) == ("g3", ["a", "b"])  # the trainer would use it too


def test_since_and_source_filter(redis_server, tmp_path, rankings):
    out = tmp_path / "f.jsonl"
    assert cli(redis_server, tmp_path, "feedback", "export", str(out), "--source", "human") == 0
    assert {r["chosen"] for r in read_jsonl(out)} == {"best", "middle", "a"}
    assert cli(redis_server, tmp_path, "feedback", "export", str(out), "--format", "kway",
               "--since", str(rankings - 60)) == 0
    assert [r["group_id"] for r in read_jsonl(out)] == ["g2", "g3"]
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(rankings - 7200))
    assert cli(redis_server, tmp_path, "feedback", "export", str(out), "--format", "kway", "--since", iso) == 0
    assert [r["group_id"] for r in read_jsonl(out)] == ["g1", "g2", "g3"]


# ---- policies export ----

def write_lora_version(client, data_dir, model_dir) -> int:
    """A LoRA policy version with non-zero adapters (so merging changes the model), promoted."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(7)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    rewards = open_registry(client, data_dir, REWARD_MODEL_KIND)
    reward = rewards.write_version(lambda folder: (folder / "model.safetensors").write_bytes(b"x"),
                                   {"rankings": {"count": 42, "human": 30, "ai": 12,
                                                 "stream": {"first_id": "1-0", "last_id": "9-0"}}})
    policies = open_registry(client, data_dir, POLICY_KIND)
    record = policies.write_version(peft_model.save_pretrained, {
        "format": POLICY_FORMAT_LORA, "parent": 0, "reward_model_version": reward.version,
        "figures": {"reward_gain": 0.25, "kl_to_ref": 0.0123}, "created_by": "test",
        "gate": {"passed": True, "why": "reward gain above the margin"}})
    policies.promote(record.version, "test", "export test")
    return record.version


def test_policies_export_writes_a_folder_transformers_loads(redis_server, redis_client, tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flywheel.app.policy_export import merged_policy
    from flywheel.config import FlywheelConfig

    data_dir = tmp_path / "data"
    version = write_lora_version(redis_client, data_dir, tiny_model_dir)
    out = tmp_path / "export"
    assert cli(redis_server, data_dir, "policies", "export", str(version), str(out), "--model", str(tiny_model_dir),
               "--dtype", "float32") == 0
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not list(out.glob("adapter_*")), "the adapter is merged, not shipped beside the weights"
    card = (out / "README.md").read_text()
    assert "parent policy: v0" in card and "reward model: v1" in card and "42 (30 human, 12 AI" in card
    assert "reward_gain | 0.25" in card and "passed: True" in card

    exported = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    settings = FlywheelConfig.load({"model": str(tiny_model_dir), "data_dir": str(data_dir), "dtype": "float32"},
                                   environ={})
    served, _ = merged_policy(settings, version)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = tokenizer("The exported policy", return_tensors="pt").input_ids
    with torch.no_grad():
        got, want, before = exported(ids).logits, served(ids).logits, base(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)  # what the servers serve as v1
    assert not torch.allclose(got, before, atol=1e-3)  # and not the base model
    # a second export to the same folder is refused rather than mixing two versions
    with pytest.raises(FileExistsError):
        cli(redis_server, data_dir, "policies", "export", str(version), str(out), "--model", str(tiny_model_dir))
