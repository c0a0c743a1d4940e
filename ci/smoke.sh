#!/usr/bin/env bash
# Pipeline smoke run: the real dvc.yaml on a tiny synthetic cohort, in a throwaway copy of the
# repository (git + DVC initialised there), with params.yaml overridden by ci/smoke_params.yaml.
# Usage: ci/smoke.sh [WORKDIR [EXTRA_PARAMS.yaml]]   (default WORKDIR: a new temporary folder)
#   EXTRA_PARAMS.yaml: more overrides merged over ci/smoke_params.yaml (e.g. a cohort the caller put
#   in WORKDIR beforehand: data.source user, data.cohort_dir ...).
#   SMOKE_DAG_ONLY=1: stop after the first `dvc repro` (no second repro, no experiments).
#   SMOKE_TARGET=STAGE: the first `dvc repro` runs STAGE and what it depends on only (with SMOKE_DAG_ONLY=1).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
BIN="$repo/.venv/bin"
export PATH="$BIN:$PATH" MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1
work="${1:-$(mktemp -d -t bonemet-smoke.XXXXXX)}"
mkdir -p "$work"
cd "$work"
cp "$repo/dvc.yaml" .
cp -r "$repo/config" . 2>/dev/null || true
ln -sfn "$repo/src" src
extra="${2:-}"
"$BIN/python" - "$repo/params.yaml" "$repo/ci/smoke_params.yaml" params.yaml "$extra" <<'PY'
import sys, yaml
from bonemet.config import deep_merge
base = yaml.safe_load(open(sys.argv[1]))
over = yaml.safe_load(open(sys.argv[2]))
merged = deep_merge(base, over)
if sys.argv[4]:
    merged = deep_merge(merged, yaml.safe_load(open(sys.argv[4])))
yaml.safe_dump(merged, open(sys.argv[3], "w"), sort_keys=False)
PY
git init -q . && git config user.email smoke@bonemet && git config user.name smoke
"$BIN/dvc" init -q && "$BIN/dvc" config core.analytics false
# the project's ignore rules: bytecode caches that Python writes under src/ (a dependency of every
# stage) while the pipeline or the tests run are no dependency (else the second repro reruns stages)
cp "$repo/.dvcignore" .dvcignore
"$BIN/dvc" check-ignore -q src/bonemet/data/__pycache__/io.cpython-311.pyc \
  || { echo "error: .dvcignore does not ignore the bytecode caches under src/"; exit 1; }
# a cohort the caller put under cohorts/ is the user's data: DVC versions it (ensure-data), not git
git add -A -- . ':(exclude)cohorts' >/dev/null && git commit -qm smoke
"$BIN/bonemet" ensure-data
# ensure-data generated (or found) the cohort at data.cohort_dir (outside data/raw) and `dvc add`ed
# it: commit the .dvc file as a user would
cohort_dir="$("$BIN/python" -c "import yaml; print(yaml.safe_load(open('params.yaml'))['data']['cohort_dir'])")"
test -f "$cohort_dir.dvc" || { echo "error: ensure-data did not version the cohort ($cohort_dir.dvc)"; exit 1; }
git add -A >/dev/null && git commit -qm "smoke cohort"
"$BIN/bonemet" ensure-data | tee ensure2.log
if [ -n "${SMOKE_TARGET:-}" ]; then "$BIN/dvc" repro "$SMOKE_TARGET"; else "$BIN/dvc" repro; fi
if [ "${SMOKE_DAG_ONLY:-0}" = "1" ]; then echo "smoke DAG done in $work"; exit 0; fi
echo "== second repro must do nothing"
"$BIN/dvc" repro | tee repro2.log
if grep -q "Running stage" repro2.log; then echo "error: second dvc repro re-ran a stage"; exit 1; fi
"$BIN/dvc" status
# the experiments below rerun stages (a failing one removes the segment stage's outputs first):
# keep the first repro's for the checks of tests/test_pipeline_smoke.py
mkdir -p first_repro/geometry && cp -r dvc.lock metrics data/auto_masks data/plan.json logs first_repro/
cp data/preprocessed/*_geometry.json first_repro/geometry/
echo "== dvc exp run -S changes one param and reruns only what depends on it"
"$BIN/dvc" exp run -q -S split.test_size=0.4 split
"$BIN/dvc" exp show --no-pager --csv > exp_show.csv
grep -q "0.4" exp_show.csv || { echo "error: experiment with split.test_size=0.4 not listed"; exit 1; }
echo "== a misspelt key fails dvc exp run, before any work"
if "$BIN/dvc" exp run -S segment.train.lrr=0.1 segment > misspelt.log 2>&1; then
  echo "error: dvc exp run -S segment.train.lrr=0.1 succeeded"; exit 1
fi
grep -q "lrr" misspelt.log || { cat misspelt.log; echo "error: DVC did not name the unknown key"; exit 1; }
# '+key=value' makes DVC add the key: then the stage itself refuses it, naming it
if "$BIN/dvc" exp run -S +segment.train.lrr=0.1 segment > misspelt.log 2>&1; then
  echo "error: dvc exp run -S +segment.train.lrr=0.1 succeeded"; exit 1
fi
grep -q "segment.train.lrr: unknown key; did you mean lr?" misspelt.log \
  || { cat misspelt.log; echo "error: the stage did not name the unknown key"; exit 1; }
echo "misspelt keys refused"
echo "smoke run passed in $work"
