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
# BONEMET_TEST_WORKERS=N: N pytest workers (pytest-xdist, each test file whole on one worker; about
# 20 instead of 28 min on 2 cores), then the serving benchmark's file alone (it measures a live
# server and once saw non-200 answers beside a pipeline test). Default 2; 0 runs one process.
# (Two workers once lost test_logs.py's warnings: a worker that had imported Great Expectations,
# which turns on logging.captureWarnings, made the capture's own call a no-op; fixed in
# bonemet.utils.worker_warnings, tested in tests/test_logs.py.)
workers="${BONEMET_TEST_WORKERS:-2}"
ALONE=tests/test_serving_benchmark.py
args=(-q --durations=25)
if [ "$workers" = 0 ]; then
  echo "== pytest (one process)"
  "$BIN/python" -m pytest "${args[@]}" "$@"
elif [ "$#" -gt 0 ]; then  # a chosen selection: as asked, on the workers
  echo "== pytest ($workers workers)"
  "$BIN/python" -m pytest "${args[@]}" -n "$workers" --dist loadfile "$@"
else
  echo "== pytest ($workers workers, then $ALONE alone)"
  "$BIN/python" -m pytest "${args[@]}" -n "$workers" --dist loadfile --ignore="$ALONE"
  "$BIN/python" -m pytest "${args[@]}" "$ALONE"
fi
