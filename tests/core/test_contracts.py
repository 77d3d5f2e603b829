"""The contracts every process agrees on: their wire values stay put, and every part uses them."""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import pytest

from flywheel.contracts import artifacts, keys
from flywheel.contracts.groups import CompletionGroup, StoredCompletion
from flywheel.contracts.heldout import is_held_out, split_prompts
from flywheel.contracts.prompts import render_prompt
from flywheel.contracts.rankings import RankingEntry, pairwise_agreement

ROOT = Path(__file__).resolve().parents[2]
CONTRACTS = ROOT / "flywheel" / "contracts"


def test_redis_names_are_the_stored_ones():
    """Renaming any of these strands what production Redis holds under the old name."""
    assert (keys.group_key("g"), keys.GROUP_KEY_PATTERN, keys.LABELLING_CANDIDATES_KEY) == (
        "flywheel:group:g", "flywheel:group:*", "flywheel:labelling:candidates")
    assert (keys.RANKINGS_STREAM, keys.DEAD_LETTER_STREAM, keys.RANKINGS_STATS_KEY) == (
        "flywheel:rankings", "flywheel:rankings:dead", "flywheel:rankings:stats")
    assert keys.idempotency_key("human", "k") == "flywheel:rankings:idempotency:human:k"
    assert keys.group_rankings_key("g") == "flywheel:group-rankings:g"
    assert keys.group_annotators_key("g") == "flywheel:group-annotators:g"
    assert keys.REWARD_MODEL_CONSUMER_GROUP == "reward-model"
    assert (keys.POLICY_RUN_LOCK_KEY, keys.REWARD_MODEL_RUN_LOCK_KEY) == (
        "flywheel:lock:policy", "flywheel:lock:reward_model")
    assert (keys.run_queued_key("policy"), keys.run_done_key("t1"), keys.run_record_key(keys.POLICY_RUN_LOCK_KEY)) == (
        "flywheel:queued:policy", "flywheel:run-done:t1", "flywheel:lock:policy:run")
    assert keys.rate_limit_key("alice") == "flywheel:ratelimit:alice"
    kind = artifacts.POLICY_KIND
    assert [keys.registry_channel(kind), keys.registry_versions_key(kind), keys.registry_current_key(kind),
            keys.registry_next_key(kind), keys.registry_audit_key(kind)] == [
        "flywheel:registry:policy", "flywheel:registry:policy:versions", "flywheel:registry:policy:current",
        "flywheel:registry:policy:next", "flywheel:registry:policy:audit"]
    assert keys.registry_current_key(artifacts.REWARD_MODEL_KIND) == "flywheel:registry:reward_model:current"


def test_artifact_names_are_the_written_ones(tmp_path):
    assert artifacts.registry_folder(tmp_path, artifacts.POLICY_KIND) == tmp_path / "policies"
    assert artifacts.registry_folder(tmp_path, artifacts.REWARD_MODEL_KIND) == tmp_path / "reward_models"
    assert artifacts.version_folder(tmp_path, 3) == tmp_path / "v3" and artifacts.VERSION_FOLDER.match("v3")
    assert (artifacts.MANIFEST, artifacts.POLICY_FORMATS) == ("manifest.json", ("lora", "full"))
    assert (artifacts.LORA_ADAPTER_FILE, artifacts.LORA_CONFIG_FILE) == ("adapter_model.safetensors",
                                                                         "adapter_config.json")
    assert (artifacts.FULL_WEIGHTS_FILE, artifacts.FULL_CONFIG_FILE, artifacts.VALUE_HEAD_FILE) == (
        "model.safetensors", "config.json", "value_head.safetensors")
    assert artifacts.REWARD_MODEL_WEIGHTS_FILE == "model.safetensors"
    assert artifacts.REWARD_MODEL_MEMBER_FILES == {"policy": "model.safetensors", "judge": "judge.safetensors"}


def test_a_version_is_verified_against_its_manifest(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"weights")
    files = {"weights.bin": artifacts.sha256_file(tmp_path / "weights.bin")}
    (tmp_path / artifacts.MANIFEST).write_text(json.dumps({"format": "lora", "files": files}))
    assert artifacts.verify_version(tmp_path)["format"] == "lora"
    (tmp_path / "weights.bin").write_bytes(b"weighs")
    with pytest.raises(artifacts.ArtifactError, match="corrupt"):
        artifacts.verify_version(tmp_path)
    (tmp_path / artifacts.MANIFEST).write_text(json.dumps({"files": {"gone.bin": "0" * 64}}))
    with pytest.raises(artifacts.ArtifactError, match="missing"):
        artifacts.verify_version(tmp_path)


def test_ai_entry_fields_round_trip():
    entry = RankingEntry("g", ["g-1", "g-0"], "ai", policy_version=7, annotator_id="ai:labeler", judge_id="judge@c",
                         pair_probabilities=[("g-0", "g-1", 0.25)], confidence=0.5)
    fields = entry.to_fields()
    assert all(isinstance(v, str) for v in fields.values())
    assert json.loads(fields["pair_probabilities"]) == [["g-0", "g-1", 0.25]] and fields["confidence"] == "0.5"
    assert RankingEntry.from_fields({k.encode(): v.encode() for k, v in fields.items()}) == entry
    with pytest.raises(ValueError):
        RankingEntry("g", ["a", "b"], "robot")


def test_agreement_counts_the_pairs_both_rankings_order():
    assert (pairwise_agreement(["a", "b", "c"], ["a", "c", "b"]).agreed_pairs,
            pairwise_agreement(["a", "b", "c"], ["a", "c", "b"]).pairs) == (2, 3)


def test_group_record_json_is_the_stored_layout():
    group = CompletionGroup("g", 2, "prompt", [1, 2], {"n": 2}, 1.5,
                            [StoredCompletion("g-0", 0, "hi", "stop", [5], [-0.25])])
    raw = group.to_json()
    assert json.loads(raw) == {"group_id": "g", "policy_version": 2, "prompt": "prompt", "prompt_token_ids": [1, 2],
                               "params": {"n": 2}, "created_at": 1.5, "completions": [
                                   {"completion_id": "g-0", "index": 0, "text": "hi", "finish_reason": "stop",
                                    "token_ids": [5], "logprobs": [-0.25]}]}
    assert CompletionGroup.from_json(raw.encode()) == group
    with pytest.raises(TypeError):  # a record without its prompt is not a group record
        CompletionGroup.from_json(json.dumps({k: v for k, v in json.loads(raw).items() if k != "prompt"}))


def test_held_out_split_is_stable_and_about_the_fraction():
    held = [f"g{i}" for i in range(2000) if is_held_out(f"g{i}", 0.2)]
    assert 300 < len(held) < 500 and held == [f"g{i}" for i in range(2000) if is_held_out(f"g{i}", 0.2)]
    assert not is_held_out("g1", 0.0) and is_held_out("g1", 1.0)


def test_split_prompts_keeps_each_prompt_once():
    class P:
        def __init__(self, text, token_ids=()):
            self.text, self.token_ids = text, tuple(token_ids)

    prompts = [P(f"q{i}") for i in range(50)] + [P("q1"), P("", [7, 8])]
    train, held_out = split_prompts(prompts, 0.3)
    assert len(train) + len(held_out) == 51  # q1 once
    keys = [p.text or "7 8" for p in held_out]  # a prompt without text is keyed by its token ids
    assert 0 < len(held_out) < 51 and all(is_held_out(key, 0.3) for key in keys)
    assert not any(is_held_out(p.text or "7 8", 0.3) for p in train)


def test_the_server_and_ppo_render_a_user_message_alike(tiny_model_dir):
    """PPO holds out prompts by the hash of the rendered text the server stored: both must agree."""
    from transformers import AutoTokenizer

    from flywheel.v1 import inference_pb2
    from serving.validation import RequestLimits, validate_request

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for message in ["What is two plus two?", "  spaces and\nnew lines ", "émoji 🙂 and <b>tags</b>"]:
        request = inference_pb2.CompleteRequest(messages=[inference_pb2.ChatMessage(role="user", content=message)])
        served = validate_request(request, tokenizer, RequestLimits())
        text, token_ids = render_prompt(tokenizer, message)
        assert (served.prompt, served.prompt_token_ids) == (text, list(token_ids))
        assert text.startswith("<|im_start|>") and text.endswith("assistant\n")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def test_contracts_import_only_the_standard_library_and_each_other():
    for path in sorted(CONTRACTS.glob("*.py")):
        for name in _imports(path):
            top = name.split(".")[0]
            assert top in sys.stdlib_module_names or name.startswith("flywheel.contracts"), (
                f"{path.name} imports {name}")


KEY_LITERAL = re.compile(r"^flywheel:[a-z]")


def _string_literals(tree: ast.AST) -> list[tuple[int, str]]:
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_no_redis_name_is_written_outside_the_contracts():
    """Every key, stream and channel comes from ``flywheel.contracts.keys`` (docstrings may name them)."""
    found = []
    for folder in ("flywheel", "serving", "feedback", "training", "bench", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if CONTRACTS in path.parents or path == Path(__file__).resolve():
                continue
            found += [f"{path.relative_to(ROOT)}:{line}: {value!r}"
                      for line, value in _string_literals(ast.parse(path.read_text(encoding="utf-8")))
                      if KEY_LITERAL.match(value)]
    assert not found, "Redis names written outside flywheel/contracts/keys.py:\n" + "\n".join(found)


def test_the_reward_model_members_split_groups_in_halves_independently_of_the_held_out_split():
    from flywheel.contracts.heldout import is_held_out, reward_model_member

    groups = [f"group-{i}" for i in range(4000)]
    judge = [g for g in groups if reward_model_member(g) == "judge"]
    assert 0.45 < len(judge) / len(groups) < 0.55
    assert all(reward_model_member(g) == reward_model_member(g) for g in groups[:50])  # stable
    held = [g for g in groups if is_held_out(g, 0.2)]
    assert 0.4 < sum(reward_model_member(g) == "judge" for g in held) / len(held) < 0.6  # independent
