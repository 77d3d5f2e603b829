"""The artifact format: where a version's files live, what they are called, and how they are verified.

A registry of ``kind`` keeps its versions under ``{data_dir}/{REGISTRY_FOLDERS[kind]}/v{N}/``: the
artifact files (safetensors only) and ``manifest.json``, whose ``files`` lists every artifact with
its SHA-256. Every reader calls ``verify_version`` before it loads anything, so a truncated or
corrupt artifact is refused with a clear error instead of being served or trained on.

The writers (training) and the readers (serving, the next training run) name files only through
the constants here:

- a policy version's ``format`` is "lora" (peft's ``save_pretrained`` folder: ``adapter_config.json``
  + ``adapter_model.safetensors``) or "full" (``model.safetensors`` + ``config.json`` of the whole
  causal LM); both add ``value_head.safetensors`` so a child run can warm-start its critic;
- a reward-model version has two members, each trained on its own half of the groups
  (``flywheel.contracts.heldout.reward_model_member``): ``model.safetensors`` is the ``policy``
  member (the reward PPO optimises) and ``judge.safetensors`` the ``judge`` member (what the policy
  gate measures a candidate with, a signal PPO never optimised against). Each file holds the
  member's trained parameters; the frozen rest is the backbone named in the manifest, and the
  manifest's ``members`` gives each member's calibration and held-out figures.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

POLICY_KIND = "policy"
REWARD_MODEL_KIND = "reward_model"
REGISTRY_FOLDERS = {POLICY_KIND: "policies", REWARD_MODEL_KIND: "reward_models"}  # under the data dir

MANIFEST = "manifest.json"
VERSION_FOLDER = re.compile(r"^v(\d+)$")

# policy artifacts
POLICY_FORMAT_LORA = "lora"
POLICY_FORMAT_FULL = "full"
POLICY_FORMATS = (POLICY_FORMAT_LORA, POLICY_FORMAT_FULL)
LORA_ADAPTER_FILE = "adapter_model.safetensors"  # peft's names for a saved adapter
LORA_CONFIG_FILE = "adapter_config.json"
FULL_WEIGHTS_FILE = "model.safetensors"
FULL_CONFIG_FILE = "config.json"
VALUE_HEAD_FILE = "value_head.safetensors"

# reward-model artifacts
POLICY_MEMBER = "policy"
JUDGE_MEMBER = "judge"
REWARD_MODEL_MEMBERS = (POLICY_MEMBER, JUDGE_MEMBER)
REWARD_MODEL_WEIGHTS_FILE = "model.safetensors"  # the policy member's
REWARD_MODEL_MEMBER_FILES = {POLICY_MEMBER: REWARD_MODEL_WEIGHTS_FILE, JUDGE_MEMBER: "judge.safetensors"}


def registry_folder(data_dir: Path | str, kind: str) -> Path:
    """Where the versions of ``kind`` live under a data directory."""
    return Path(data_dir) / REGISTRY_FOLDERS[kind]


def version_folder(root_dir: Path | str, version: int) -> Path:
    return Path(root_dir) / f"v{version}"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file: manifests list one per artifact, and loaders verify them."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ArtifactError(RuntimeError):
    """A version folder that cannot be used: no manifest, a manifest that does not parse, or an
    artifact that is missing or fails its checksum. Messages name the version, not paths (they
    reach API clients)."""


def verify_version(folder: Path) -> dict:
    """The manifest of a version folder, after checking every listed artifact's SHA-256."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{folder.name} has no {MANIFEST} (missing or half-written version)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"the {MANIFEST} of {folder.name} is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise ArtifactError(f"the {MANIFEST} of {folder.name} is not a JSON object")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"the {MANIFEST} of {folder.name} lists no artifact files with checksums")
    for name, expected in files.items():
        path = folder / name
        if not name or Path(name).name != name or name == MANIFEST or not path.is_file():
            raise ArtifactError(f"artifact {name[:80]!r} of {folder.name} is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactError(f"artifact {name} of {folder.name} is corrupt: sha256 {actual[:12]}… "
                                f"does not match the manifest's {str(expected)[:12]}…")
    return manifest
