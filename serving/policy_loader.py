"""Load a policy version from its artifact folder, refusing anything that does not check out.

Version 0 is the base model. A trained version lives in ``{policies_dir}/v{N}/`` with a
``manifest.json`` (the format: ``flywheel.contracts.artifacts``) that lists every artifact file with its SHA-256; the files are verified before
anything is read, so a truncated or corrupt artifact is refused with a clear error (and the server
keeps its current version). A LoRA version ("format": "lora", a peft adapter) is merged into a
copy of the base weights, so serving it costs nothing per token; a "full" version is a whole
causal-LM state dict in safetensors.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from flywheel.contracts.artifacts import (FULL_WEIGHTS_FILE, POLICY_FORMAT_FULL, POLICY_FORMAT_LORA, POLICY_FORMATS,
                                         ArtifactError, verify_version, version_folder)

log = logging.getLogger(__name__)


class PolicyLoadError(ArtifactError):
    """The version cannot be served: missing, corrupt, or not loadable."""


@dataclass
class LoadedPolicy:
    version: int
    model: torch.nn.Module
    seconds: float


def read_verified_manifest(folder: Path) -> dict:
    """The manifest of a version folder, after checking every listed file's SHA-256."""
    try:
        return verify_version(folder)
    except PolicyLoadError:
        raise
    except ArtifactError as exc:
        raise PolicyLoadError(str(exc)) from exc


class PolicyLoader:
    """Builds the model of any policy version from the base model kept in memory."""

    def __init__(self, base_model: torch.nn.Module, policies_dir: Path) -> None:
        self.base_model = base_model
        self.policies_dir = Path(policies_dir)

    def load(self, version: int) -> LoadedPolicy:
        started = time.perf_counter()
        if version == 0:
            return LoadedPolicy(0, self.base_model, time.perf_counter() - started)
        folder = version_folder(self.policies_dir, version)
        manifest = read_verified_manifest(folder)
        fmt = manifest.get("format")
        try:
            if fmt == POLICY_FORMAT_LORA:
                model = self._merge_lora(folder)
            elif fmt == POLICY_FORMAT_FULL:
                model = self._load_full(folder)
            else:
                raise PolicyLoadError(f"v{version}: unknown artifact format {fmt!r} "
                                      f"(expected {' or '.join(POLICY_FORMATS)})")
        except PolicyLoadError:
            raise
        except Exception as exc:  # a file that checks out but does not fit this base model
            raise PolicyLoadError(f"v{version} does not load onto the base model: {exc}") from exc
        model.eval()
        model.requires_grad_(False)
        return LoadedPolicy(version, model, time.perf_counter() - started)

    def _merge_lora(self, folder: Path) -> torch.nn.Module:
        from peft import PeftModel

        base = copy.deepcopy(self.base_model)
        return PeftModel.from_pretrained(base, folder, is_trainable=False).merge_and_unload()

    def _load_full(self, folder: Path) -> torch.nn.Module:
        from safetensors.torch import load_file

        model = copy.deepcopy(self.base_model)
        state = load_file(folder / FULL_WEIGHTS_FILE)
        dtype = next(model.parameters()).dtype
        missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
        missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
        if missing or unexpected:
            raise PolicyLoadError(f"{folder.name}: state dict does not match the base model "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        return model
