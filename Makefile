# bonemet: two commands on a fresh clone.
#   make run   builds .venv (torch==2.13.0 CPU first), then runs the whole pipeline (dvc repro)
#   make test  builds .venv if missing, then lint + tests (ci/test.sh)
# Both are idempotent: a second `make run` with nothing changed only checks and returns.

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

.PHONY: run test venv lint data repro clean-venv

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
	@echo "pipeline done: metrics in metrics/, report in reports/index.html, runs in 'mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db'"

test: $(STAMP)
	bash ci/test.sh

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean-venv:
	rm -rf $(VENV)
