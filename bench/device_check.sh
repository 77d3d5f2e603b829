#!/usr/bin/env bash
# The GPU path's checks (issue 13), for a machine with a GPU: the device tests' CUDA cases, then
# the decode-step benchmark and one PPO iteration on the GPU, each against its baseline in the same
# run (transformers' forward on the same GPU; the same PPO iteration on this machine's CPU).
#
#   bench/device_check.sh --prepare   # here: the model's config and tokenizer into bench/.device-model
#   bench/device_check.sh             # there (the device tool: carry bench/.device-model)
#
# The model: FLYWHEEL_CHECK_MODEL, else the converted embedded model where it is on disk, else
# bench/.device-model, whose weights are made random on first use (a GPU machine cannot fetch the
# embedded model's package; step times and PPO times do not depend on the weights' values).
# On a machine without a GPU it runs the device tests' CPU cases, says "no GPU" and passes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
EMBEDDED=.flywheel/models/SmolLM2-135M-Instruct
SHAPE=bench/.device-model

if [ "${1:-}" = "--prepare" ]; then
  [ -f "$EMBEDDED/config.json" ] || "$PY" -c 'from flywheel.models import resolve_model_path; resolve_model_path("", ".flywheel")'
  mkdir -p "$SHAPE"
  cp "$EMBEDDED"/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja} "$SHAPE"/
  echo "prepared $SHAPE ($(du -sh "$SHAPE" | cut -f1)): carry it to the GPU machine"
  exit 0
fi

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "no GPU: torch.cuda.is_available() is False here; the device tests' CPU cases only:"
  "$PY" -m pytest -q -p no:cacheprovider tests/device --ignore=tests/device/test_device_check.py
  echo "no GPU: the CUDA cases and the GPU benchmarks were not run"
  exit 0
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
echo "== the device tests (CPU and CUDA cases)"
"$PY" -m pytest -q -p no:cacheprovider tests/device --ignore=tests/device/test_device_check.py

MODEL=${FLYWHEEL_CHECK_MODEL:-}
if [ -z "$MODEL" ]; then
  if [ -f "$EMBEDDED/model.safetensors" ]; then MODEL=$EMBEDDED; else MODEL=$SHAPE; fi
fi
if ! ls "$MODEL"/*.safetensors >/dev/null 2>&1; then
  echo "== $MODEL has no weights: random ones of its config (speed only)"
  "$PY" - "$MODEL" <<'PY'
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(sys.argv[1]), dtype=torch.float32).save_pretrained(sys.argv[1])
PY
fi
echo "== one decode step on the GPU: the lean step against transformers' forward (bench/step.py)"
"$PY" bench/step.py --device cuda --model "$MODEL" --rows 1 16 64 256 --steps 30
echo "== one PPO iteration on the GPU against the same on the CPU (bench/train_ppo.py)"
"$PY" bench/train_ppo.py --device cuda --model "$MODEL"
