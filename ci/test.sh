#!/usr/bin/env bash
# The project's test command (README: `make test`): lint, then the whole test suite, which
# includes a pipeline smoke run on a tiny synthetic cohort (tests/test_pipeline_smoke.py).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
export MLFLOW_DISABLE_TELEMETRY=true MLFLOW_ALLOW_FILE_STORE=true DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1 PYTHONUTF8=1
export BONEMET_PROGRESS=0   # no progress bars in CI logs
export PATH="$PWD/$BIN:$PATH"
echo "== ruff"
"$BIN/ruff" check src tests benchmarks
echo "== pytest"
"$BIN/python" -m pytest -q --durations=25 "$@"
