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
# and git's as in the project: logs/, metrics/, models/, mlruns/ ... are never committed, so a clone
# has only what git and the DVC cache give it
cp "$repo/.gitignore" .gitignore
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
git add -A >/dev/null && git commit -qm "pipeline run"
# the experiments below rerun stages (a failing one removes the segment stage's outputs first):
# keep the first repro's for the checks of tests/test_pipeline_smoke.py
mkdir -p first_repro/geometry && cp -r dvc.lock metrics data/auto_masks data/plan.json logs first_repro/
cp data/preprocessed/*_geometry.json first_repro/geometry/
cp -r .cache/segmentation first_repro/checkpoints

echo "== a fresh clone pulls every output and recomputes nothing (logs/ git-ignored, as in the project)"
"$BIN/dvc" remote add -q -d local "$work.remote" && git commit -qam "local DVC remote" && "$BIN/dvc" push -q
rm -rf "$work.clone" && git clone -q . "$work.clone"
test ! -e "$work.clone/logs" || { echo "error: logs/ reached git"; exit 1; }
(cd "$work.clone" && "$BIN/dvc" pull -q && "$BIN/dvc" status > "$work/clone_status.log" \
  && "$BIN/dvc" repro > "$work/clone_repro.log")
cat clone_status.log
grep -q "Running stage" clone_repro.log && { echo "error: dvc repro in a fresh clone re-ran a stage"; exit 1; }
grep -q "Data and pipelines are up to date" clone_status.log || { echo "error: a fresh clone is not up to date"; exit 1; }
rm -rf "$work.clone"
echo "clone up to date"

echo "== the whole pipeline again, forced, with a CPU-burning process beside it: the same bytes"
"$BIN/python" -c "while True: pass" &
burner=$!
"$BIN/dvc" repro -f -q || { kill $burner; exit 1; }
kill $burner
cp dvc.lock forced.lock && mkdir -p forced && cp -r .cache/segmentation forced/checkpoints
git add -A >/dev/null && git commit -qm "forced rerun"

echo "== two queued experiments that change a register param: only register and report rerun, into the one store"
# the project's own store (tracking.store_dir at the repository root), not the server of the runs above
(
  unset MLFLOW_TRACKING_URI
  "$BIN/dvc" exp run --queue -q -n exp-a -S register.min_auc=0.01
  "$BIN/dvc" exp run --queue -q -n exp-b -S register.min_auc=0.02
  "$BIN/dvc" queue start -j 2 > /dev/null
  for _ in $(seq 600); do
    "$BIN/dvc" queue status > queue_status.log 2>&1
    grep -qE "Queued|Running" queue_status.log || break
    sleep 1
  done
  cat queue_status.log
  for name in exp-a exp-b; do "$BIN/dvc" queue logs "$name" > "queue_$name.log" 2>&1; done
  "$BIN/dvc" exp show --no-pager --csv > queued_show.csv

  echo "== dvc queue kill leaves nothing running"
  "$BIN/dvc" exp run --queue -q -n exp-kill -S segment.train.lr=0.21
  "$BIN/dvc" queue start -j 1 > /dev/null
  # this checkout's stage only (its venv's bonemet): another project's `bonemet segment` on the
  # same machine is none of this test's business
  stage="$(cd "$BIN" && pwd)/bonemet segment"
  for _ in $(seq 600); do pgrep -f "$stage" > /dev/null && break; sleep 0.5; done
  sleep 5   # its fold workers started
  pgrep -f "$stage" > kill_before.txt || true
  "$BIN/dvc" queue kill exp-kill > /dev/null 2>&1
  for _ in $(seq 60); do pgrep -f "$stage" > /dev/null || break; sleep 0.5; done
  pgrep -af "$stage" > kill_after.txt || true
  "$BIN/dvc" queue stop --kill > /dev/null 2>&1 || true
)
echo "queued experiments done"

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
