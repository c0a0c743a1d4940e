"""The whole DVC pipeline on a tiny synthetic cohort (ci/smoke.sh), then `dvc repro` again is a no-op.

The smoke cohort is a user's cohort as the README describes it: outside data/raw (cohorts/smoke,
versioned by its own .dvc file) and with lesion label 2 (ci/smoke_params.yaml), so the run checks
that every stage follows data.cohort_dir and data.mask_label.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dvc_pipeline_smoke_run(tmp_path):
    work = tmp_path / "smoke"
    proc = subprocess.run(
        ["bash", str(REPO / "ci" / "smoke.sh"), str(work)], capture_output=True, encoding="utf-8", errors="replace",
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    assert "second repro must do nothing" in proc.stdout and "smoke run passed" in proc.stdout
    assert "misspelt keys refused" in proc.stdout
    for out in ["data/validation/report.json", "data/splits.json", "metrics/table1.json", "metrics/summary.json",
                "metrics/repeated.json", "reports/index.html"]:
        assert (work / out).exists(), out

    # the cohort lives outside data/raw, is versioned by DVC, and is a dependency of the stages
    params = yaml.safe_load((work / "params.yaml").read_text())
    cohort = work / params["data"]["cohort_dir"]
    assert params["data"]["cohort_dir"] == "cohorts/smoke" and params["data"]["mask_label"] == 2
    assert not (work / "data" / "raw").exists()
    dvc_file = yaml.safe_load((work / "cohorts" / "smoke.dvc").read_text())
    assert dvc_file["outs"][0]["path"] == "smoke" and dvc_file["outs"][0]["md5"].endswith(".dir")
    first = work / "first_repro"  # the outputs of the first `dvc repro`, before the experiments
    lock = yaml.safe_load((first / "dvc.lock").read_text())
    for stage in ("validate", "preprocess", "segment", "extract", "train"):
        assert "cohorts/smoke" in [d["path"] for d in lock["stages"][stage]["deps"]], stage
    # label 2 everywhere: validation, the automatic masks, Dice, every case's features
    report = json.loads((work / "data/validation/report.json").read_text())
    assert report["passed"] and report["params"]["mask_label"] == 2
    cases = pd.read_csv(cohort / "manifest.csv")["case_id"].tolist()
    import SimpleITK as sitk

    values = np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(cohort / "masks" / f"{cases[0]}.nii.gz"))))
    assert set(values.tolist()) == {0, 2}
    auto = sorted((first / "auto_masks").glob("*.nii.gz"))
    assert len(auto) == len(cases)
    assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(auto[0])))).tolist()) <= {0, 2}
    seg = json.loads((first / "metrics/segmentation.json").read_text())
    assert seg["n_cases"] == len(cases) and math.isfinite(seg["dice_mean"]) and seg["dice_mean"] > 0
    assert seg["gate"]["promote"] and seg["gate"]["registered"] and seg["gate"]["min_dice"] == 0.0
    # the registered classifier's training domain, fitted by the train stage
    registry = json.loads((first / "metrics/registry.json").read_text())
    domain = json.loads((work / "models/domain.json").read_text())
    assert domain[registry["classifier"]]["oof_flag_rate"] <= params["train"]["domain"]["max_flag_rate"]
    assert (work / "models" / f"{registry['classifier']}.domain.skops").is_file()
    for source in ("manual", "auto", "annotator"):
        table = pd.read_parquet(work / "data/features" / f"{source}.parquet")
        assert sorted(table["case_id"]) == sorted(cases), source
        assert table["original_shape_VoxelVolume"].gt(0).all(), source
