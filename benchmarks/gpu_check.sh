#!/usr/bin/env bash
# The GPU measurements of issue 16 §4, in one run of at most 8 minutes on the card:
#   1. the paper-profile training step of MISSU against MONAI UNETR on the same 128^3 crop (bf16;
#      target: MISSU <= 1.2x UNETR's time), with their sliding-window and memory figures, and the
#      paper MISSU's sliding-window inference of a clinical-size CT (512 x 512 x 200 at
#      0.8 x 0.8 x 1.5 mm, preprocessed to 1 mm): benchmarks/networks.py;
#   2. a few epochs (3) of one fold at full size (paper profile, 1 mm, 128^3 crops) on a 60-case
#      synthetic cohort: benchmarks/segmentation.py;
#   3. one summary, with the card's name from nvidia-smi and torch: benchmarks/results/gpu_check.json
#      (and the two scripts' own JSON beside it).
#
#   bash benchmarks/gpu_check.sh          on a machine with a CUDA GPU
#   bash benchmarks/gpu_check.sh --cpu    the same steps with tiny sizes on the CPU, in seconds (a test runs this)
#
# Environment: PYTHON (default .venv/bin/python, else python3: on the lent H200 image python3 holds
# torch with CUDA), GPU_CHECK_OUT (results folder, default benchmarks/results), GPU_CHECK_WHEELS
# (a folder of wheels for what that python lacks: installed with --no-index first; on the H200 image
# SimpleITK, monai, pydantic, pydantic_core, annotated-types, typing-inspection and pydicom, about
# 60 MB; make it here with
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 --no-deps \
#       -d gpu_wheels simpleitk==2.5.7 monai==1.6.1 pydantic==2.14.4 pydantic_core==2.50.5 \
#       annotated-types==0.8.0 typing-inspection==0.4.5 pydicom==3.0.2
# and carry gpu_wheels). bonemet itself is used from src/ (PYTHONPATH), not installed.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
if [[ "${1:-}" == "--cpu" ]]; then MODE=cpu; fi
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT="${GPU_CHECK_OUT:-benchmarks/results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUTF8=1 MLFLOW_DISABLE_TELEMETRY=true MPLBACKEND=Agg

if [[ -n "${GPU_CHECK_WHEELS:-}" ]]; then
  "$PYTHON" -m pip install --quiet --no-index --no-deps --find-links "$GPU_CHECK_WHEELS" "$GPU_CHECK_WHEELS"/*.whl
fi

START=$(date +%s)
if [[ "$MODE" == gpu ]]; then
  CARD=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1 || true)
  timeout 200 "$PYTHON" benchmarks/networks.py --profile paper --networks missu unetr --roi 128 --batch 2 \
    --device cuda --amp --warmup 3 --steps 10 --repeats 3 --sw-batch 4 --overlap 0.5 --volume 256 256 160 \
    --clinical --spacing 1 --json "$OUT/gpu_networks.json"
  timeout 260 "$PYTHON" benchmarks/segmentation.py --profile paper --variants missu --n-folds 1 --max-epochs 3 \
    --synthetic 60 --spacing 1 --device cuda --threads 8 --json "$OUT/gpu_segmentation.json"
else
  CARD="cpu (tiny sizes: a test of this script, not a measurement)"
  "$PYTHON" benchmarks/networks.py --quick --networks missu unetr --device cpu --json "$OUT/gpu_networks.json"
  "$PYTHON" benchmarks/segmentation.py --quick --variants missu --device cpu --json "$OUT/gpu_segmentation.json"
fi
END=$(date +%s)

CARD="$CARD" MODE="$MODE" SECONDS_TOTAL=$((END - START)) OUT="$OUT" "$PYTHON" - <<'PY'
import json, os
from pathlib import Path

out = Path(os.environ["OUT"])
networks = json.loads((out / "gpu_networks.json").read_text())
segmentation = json.loads((out / "gpu_segmentation.json").read_text())
steps = {r["network"]: r.get("train_step_s") for r in networks["rows"]}
ratio = steps["missu"] / steps["unetr"] if steps.get("missu") and steps.get("unetr") else None
summary = {
    "mode": os.environ["MODE"], "card": os.environ["CARD"], "torch_device": networks["machine"].get("gpu"),
    "seconds_total": int(os.environ["SECONDS_TOTAL"]),
    "train_step_s": steps, "missu_over_unetr": ratio, "target_missu_over_unetr": 1.2,
    "meets_target": None if ratio is None else ratio <= 1.2,
    "clinical_ct_inference": networks.get("clinical_ct"),
    "fold_epochs": segmentation["results"],
    "setup": {"networks": networks["args"], "segmentation": segmentation["setup"]},
}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps({k: summary[k] for k in ("mode", "card", "seconds_total", "train_step_s", "missu_over_unetr")}))
PY
