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
# Two pytest workers (pytest-xdist), each test file whole on one of them (its module fixtures set up
# once): the suite is half single-threaded unit tests and half pipeline runs that wait on their
# subprocesses, so one process left a core idle. BONEMET_TEST_WORKERS=0 runs it in one process.
workers="${BONEMET_TEST_WORKERS:-2}"
echo "== pytest ($workers workers)"
args=(-q --durations=25)
[ "$workers" = 0 ] || args+=(-n "$workers" --dist loadfile)
"$BIN/python" -m pytest "${args[@]}" "$@"
