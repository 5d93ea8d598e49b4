# Set-up and entry points. `make run` and `make test` create the virtual environment when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
UV_VERSION := 0.13.8

export MORER1_STATE_DIR ?= $(CURDIR)/.state
export PREFECT_HOME ?= $(MORER1_STATE_DIR)/prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export GX_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install run test bench ui

# torch and torchvision go in first, by pip (they come from this machine's disk); their exact pins are
# read from pyproject.toml, where every pin lives. uv then installs the rest and leaves torch alone.
$(VENV)/.installed: pyproject.toml infra/plots/build_offline_template.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $$($(PY) -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); print(' '.join(r for r in d['project']['dependencies'] if r.split('==')[0] in ('torch', 'torchvision')))")
	$(PY) -m pip install -q uv==$(UV_VERSION)
	$(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) -e '.[dev]'
	$(PY) infra/plots/build_offline_template.py  # `dvc plots show` page with Vega inlined (fetched from npm)
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed  ## the whole pipeline on the embedded default, through the Prefect flow
	$(PY) flows/pipeline.py

test: $(VENV)/.installed  ## all tests but the fault suite, including one end-to-end run on a tiny demo
	$(PY) -m pytest -q

.PHONY: test-faults
test-faults: $(VENV)/.installed  ## the fault suite (tests/test_faults.py): kill -9, two runs at once, a lost tracking server, corrupt checkpoints, determinism
	$(PY) -m pytest -q -m faults

.PHONY: test-cluster
test-cluster: $(VENV)/.installed  ## two work pools on this machine (tests/test_cluster.py): sft and grpo on a `gpu` worker in its own clone, data through a DVC remote, the worker killed once
	$(PY) -m pytest -q -m cluster

bench: $(VENV)/.installed  ## benchmark suite: tables on stdout, JSON in reports/bench/, MLflow runs; BENCH_QUICK=1 for small sizes
	$(PY) benchmarks/run_all.py

.PHONY: ablate
ablate: $(VENV)/.installed  ## ablation grid of ablation.yaml (docs/ablation.md): a DVC experiment per cell, table in reports/ablation/; GRID=file PROFILE=name FORCE=1
	$(PY) flows/ablate.py $(if $(GRID),--grid $(GRID)) $(if $(PROFILE),--profile $(PROFILE)) $(if $(FORCE),--force)

ui: $(VENV)/.installed  ## MLflow UI on the local tracking store, http://127.0.0.1:5000
	@echo "morer1 runs in MLflow's model-training view (its UI opens experiments in the GenAI one):"
	@echo "  http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning"
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(MORER1_STATE_DIR)/mlflow.db --host 127.0.0.1 --port 5000

# GPU node: the stack plus morer1[cluster] (deepspeed, vllm, dvc-s3) from the registry, with the extra's own
# torch/torchvision/numpy pins in place of the base ones (uv --override, generated from pyproject.toml; why:
# the comment above the extra). Run it instead of `make install` there, and again after pyproject.toml changes:
# `make install` would put the CPU stack's torch back.
.PHONY: cluster-install
cluster-install:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q uv==$(UV_VERSION)
	$(PY) -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; base = {r.split('==')[0] for r in p['dependencies']}; print('\n'.join(r for r in p['optional-dependencies']['cluster'] if r.split('==')[0] in base))" > $(VENV)/cluster-overrides.txt
	$(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) --override $(VENV)/cluster-overrides.txt -e '.[dev,cluster]'
	$(PY) infra/plots/build_offline_template.py
	touch $(VENV)/.installed

# Code deps of each stage in dvc.yaml: the import closure of its module in src/morer1 (morer1.codedeps).
# `make deps` rewrites the `- src/morer1/...` dep lines in place; `make deps-check` only lists differences.
.PHONY: deps deps-check
deps: $(VENV)/.installed
	$(PY) -m morer1.codedeps --write

deps-check: $(VENV)/.installed
	$(PY) -m morer1.codedeps --check
