"""``flywheel policies export N DIR``: a policy version as a plain Hugging Face model folder.

The folder is what any tool loads without Flywheel: ``model.safetensors`` with the LoRA adapter
merged into the base weights (the same merge the servers do, ``serving.policy_loader``),
``config.json`` and ``generation_config.json``, the tokenizer files, and a ``README.md`` model
card with the version's lineage read from the registries: the parent version, the reward model it
was trained against and the rankings that reward model learned from, and the evaluation gate's
figures. ``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` and vLLM load it as it is.
The folder is written beside DIR and renamed into place, so a failed export leaves nothing half done.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from flywheel.contracts.artifacts import POLICY_KIND, REWARD_MODEL_KIND, registry_folder


def merged_policy(settings, version: int):
    """(model, tokenizer) of ``version``: the base model with the version's weights merged in."""
    from flywheel.models import load_model
    from serving.policy_loader import PolicyLoader

    base = load_model(settings.model, settings.data_dir, settings.dtype)
    loaded = PolicyLoader(base.model, registry_folder(settings.data_dir, POLICY_KIND)).load(version)
    return loaded.model, base.tokenizer


def model_card(version: int, manifest: dict, reward_manifest: dict | None, base_model: str) -> str:
    figures = manifest.get("figures") or {}
    rankings = (reward_manifest or {}).get("rankings") or {}
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [flywheel, rlhf, ppo]",
        "---", "", f"# Flywheel policy v{version}", "",
        f"Exported by `flywheel policies export` on {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}: "
        f"the base model with this version's weights merged in (format {manifest.get('format', 'base')!r}).", "",
        "## Lineage", "",
        f"- base model: `{manifest.get('base_model') or base_model}`",
        f"- parent policy: v{manifest.get('parent', 0) if manifest else '-'}",
        f"- reward model: v{manifest.get('reward_model_version', '-')}",
        f"- rankings the reward model learned from: {rankings.get('count', '-')} "
        f"({rankings.get('human', '-')} human, {rankings.get('ai', '-')} AI; stream "
        f"{(rankings.get('stream') or {}).get('first_id', '')}..{(rankings.get('stream') or {}).get('last_id', '')})",
        f"- created by {manifest.get('created_by', '-')}"
        + (f" at {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(manifest['created_at']))}"
           if manifest.get("created_at") else ""), "",
        "## Evaluation gate", "",
    ]
    gate = manifest.get("gate") or {}
    if gate:
        lines.append(f"passed: {gate.get('passed')}; {gate.get('why', '')}".rstrip("; "))
        lines.append("")
    lines += ["| figure | value |", "| --- | --- |"]
    lines += [f"| {name} | {value:.6g} |" if isinstance(value, (int, float)) else f"| {name} | {value} |"
              for name, value in sorted(figures.items())]
    lines += ["", "## Manifest", "", "```json", json.dumps(manifest, indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)


def export_policy(settings, client, version: int, target: Path) -> Path:
    """Write ``version`` as a Hugging Face folder at ``target`` (which must not exist or be empty)."""
    from transformers import AutoModelForCausalLM

    from flywheel.registry import open_registry

    target = Path(target)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not empty")
    manifest: dict = {}
    reward_manifest = None
    if version != 0:
        record = open_registry(client, settings.data_dir, POLICY_KIND).get(version)
        if record is None:
            raise LookupError(f"policy v{version} is not in the registry (see `flywheel policies`)")
        manifest = record.manifest
        reward_version = manifest.get("reward_model_version")
        if reward_version:
            reward = open_registry(client, settings.data_dir, REWARD_MODEL_KIND).get(int(reward_version))
            reward_manifest = reward.manifest if reward is not None else None
    model, tokenizer = merged_policy(settings, version)
    # a model built from its config saves where a GGUF-loaded one refuses to (docs/ARCHITECTURE.md)
    plain = AutoModelForCausalLM.from_config(model.config)
    plain.load_state_dict(model.state_dict())
    if model.generation_config is not None:
        plain.generation_config = model.generation_config
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    plain.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / "README.md").write_text(model_card(version, manifest, reward_manifest, settings.model or "embedded"),
                                       encoding="utf-8")
    if target.exists():
        target.rmdir()
    staging.rename(target)
    return target
