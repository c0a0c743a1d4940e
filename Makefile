# bonemet: two commands on a fresh clone.
#   make run   builds .venv (torch==2.13.0 CPU first), then runs the whole pipeline (dvc repro)
#   make test  builds .venv if missing, then lint + tests (ci/test.sh)
# Both are idempotent: a second `make run` with nothing changed only checks and returns.
# And:
#   make exp ARGS='-S split.test_size=0.4'   one experiment: `dvc exp run ARGS` with the venv's bonemet
#   make ui                                  the MLflow UI over the project's store on http://127.0.0.1:5000
# The stage commands in dvc.yaml call `bonemet`: these targets put .venv/bin on PATH for them, so
# nothing needs activating (or run `source .venv/bin/activate` once and call dvc yourself).

SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export MLFLOW_DISABLE_TELEMETRY := true
export MLFLOW_ALLOW_FILE_STORE := true
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export PATH := $(CURDIR)/$(BIN):$(PATH)

# MLflow UI address (make ui) and the project's store (params tracking.store_dir).
UI_HOST ?= 127.0.0.1
UI_PORT ?= 5000
STORE ?= mlruns

.PHONY: run test venv lint data repro exp ui clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (bonemet needs Python 3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[dev]"
	touch $(STAMP)

# The raw cohort (params.yaml data.cohort_dir): the user's own or, when params say `synthetic` and
# the folder is missing, regenerated from its seed (byte-identical, so `dvc status data.dvc` stays
# clean). ensure-data also versions it with DVC: data.dvc tracks data/raw; a cohort elsewhere gets
# `dvc add <cohort_dir>` (writes <cohort_dir>.dvc) the first time.
data: $(STAMP)
	$(BIN)/bonemet ensure-data

run: data
	@test -d .dvc || { echo "error: no .dvc folder: run from a clone of the bonemet repository"; exit 1; }
	$(BIN)/dvc config core.analytics false --local
	$(BIN)/dvc repro
	@echo "pipeline done: metrics in metrics/, report in reports/index.html, runs in the MLflow UI: make ui"

# One DVC experiment, e.g. make exp ARGS='-S split.test_size=0.4 split' (ARGS go to `dvc exp run`).
exp: data
	$(BIN)/dvc exp run $(ARGS)

# The MLflow UI on the project's store (runs, nested fold and model runs, datasets, registered models).
ui: $(STAMP)
	@mkdir -p $(STORE)/artifacts
	@echo "MLflow UI: open http://$(UI_HOST):$(UI_PORT)/#/experiments?workflowType=machine_learning (Ctrl-C stops it)"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/$(STORE)/mlflow.db \
	  --default-artifact-root $(CURDIR)/$(STORE)/artifacts --host $(UI_HOST) --port $(UI_PORT)

test: $(STAMP)
	bash ci/test.sh

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean-venv:
	rm -rf $(VENV)
