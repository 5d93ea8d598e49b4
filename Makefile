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

.PHONY: install run test ui

# torch and torchvision go in first, by pip (they come from this machine's disk); their exact pins are
# read from pyproject.toml, where every pin lives. uv then installs the rest and leaves torch alone.
$(VENV)/.installed: pyproject.toml infra/plots/build_offline_template.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $$($(PY) -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); print(' '.join(r for r in d['project']['dependencies'] if r.split('==')[0] in ('torch', 'torchvision')))")
	$(PY) -m pip install -q uv==$(UV_VERSION)
	$(VENV)/bin/uv pip install -q --python $(PY) -e '.[dev]'
	$(PY) infra/plots/build_offline_template.py  # `dvc plots show` page with Vega inlined (fetched from npm)
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed  ## the whole pipeline on the embedded default, through the Prefect flow
	$(PY) flows/pipeline.py

test: $(VENV)/.installed  ## all tests, including one end-to-end run on a tiny demo
	$(PY) -m pytest -q

ui: $(VENV)/.installed  ## MLflow UI on the local tracking store, http://127.0.0.1:5000
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(MORER1_STATE_DIR)/mlflow.db --host 127.0.0.1 --port 5000
