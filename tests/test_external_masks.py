"""segment.model external: masks made elsewhere (nnU-Net naming) become the automatic masks.

A tiny synthetic cohort (lesion label 2) whose annotator masks, relabelled 1 as nnU-Net writes them,
play the external tool's predictions; one of them on another (finer) grid.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from bonemet.cli import main
from bonemet.data.io import read_image, read_mask, same_grid, write_image
from bonemet.data.manifest import read_manifest
from bonemet.data.synthetic import generate_cohort

LABEL = 2  # data.mask_label of this cohort: not the external tool's 1


@pytest.fixture
def cohort(tmp_path) -> Path:
    root = tmp_path / "cohort"
    generate_cohort(root, n_cases=4, n_positive=2, seed=21, size="small", mask_label=LABEL, overwrite=True,
                    show_progress=False)
    external = root / "external_masks"
    external.mkdir()
    for i, case in enumerate(read_manifest(root)):
        mask = read_mask(case.annotator_mask, label=LABEL)  # 0/1, as nnU-Net writes a one-class lesion model
        if i == 1:  # another tool's grid: twice as fine, same physical space
            mask = sitk.Resample(mask, [2 * s for s in mask.GetSize()], sitk.Transform(), sitk.sitkNearestNeighbor,
                                 mask.GetOrigin(), [s / 2 for s in mask.GetSpacing()], mask.GetDirection(), 0,
                                 mask.GetPixelID())
        write_image(mask, external / f"{case.case_id}.nii.gz")
    return root


@pytest.fixture
def stage_params(tmp_path, params_file, cohort, monkeypatch):
    settings = tmp_path / "fast_radiomics.yaml"
    settings.write_text("imageType: {Original: {}}\nfeatureClass: {shape: [], firstorder: []}\nsetting: {}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    return params_file({
        "data": {"cohort_dir": str(cohort), "mask_label": LABEL},
        "segment": {"model": "external", "external": {"masks_dir": "external_masks", "label": 1}},
        "radiomics": {"settings_file": str(settings), "resampled_spacing_mm": [], "n_jobs": 1,
                      "cache_dir": str(tmp_path / "cache"), "sources": ["auto", "annotator"]},
    })


def test_external_masks_are_the_automatic_masks(cohort, stage_params, tmp_path):
    import mlflow

    assert main(["segment", "--params", str(stage_params)]) == 0
    cases = read_manifest(cohort)
    auto = Path("data/auto_masks")
    assert sorted(p.name for p in auto.glob("*.nii.gz")) == sorted(f"{c.case_id}.nii.gz" for c in cases)
    for case in cases:
        written = read_image(auto / f"{case.case_id}.nii.gz")
        assert same_grid(read_image(case.image), written, tol_mm=1e-6)[0]  # on the CT's own grid
        assert set(np.unique(sitk.GetArrayViewFromImage(written))) == {0, LABEL}  # the cohort's lesion label
        np.testing.assert_array_equal(sitk.GetArrayFromImage(read_mask(auto / f"{case.case_id}.nii.gz", label=LABEL)),
                                      sitk.GetArrayFromImage(read_mask(case.annotator_mask, label=LABEL)))
    # Dice against the manual masks: the annotator's agreement, case by case
    summary = json.loads(Path("metrics/segmentation.json").read_text())
    rows = pd.read_csv("metrics/segmentation_cases.csv").set_index("case_id")
    truth = {c["case_id"]: c["dice_annotator"] for c in json.loads((cohort / "cohort.json").read_text())["cases"]}
    for cid, dice in truth.items():
        assert rows.loc[cid, "dice"] == pytest.approx(dice, abs=1e-4)
    assert summary["model"] == "external" and summary["n_cases"] == 4 and 0.5 < summary["dice_mean"] < 1
    assert np.isfinite(summary["hd95_mean"]) and "volume_diff_ml_mean" in summary
    assert Path("plots/segmentation/dice_histogram.png").is_file()
    # tracked in MLflow, nothing registered
    runs = mlflow.search_runs(experiment_names=["bonemet-segmentation"])
    assert len(runs) == 1 and runs.iloc[0]["params.model"] == "external"
    assert runs.iloc[0]["metrics.dice_mean"] == pytest.approx(summary["dice_mean"])
    assert mlflow.MlflowClient().search_registered_models() == []

    # downstream unchanged: extract reads them like MISSU's masks; same voxels, same features
    assert main(["extract", "--params", str(stage_params), "--no-tracking", "--no-progress"]) == 0
    features = Path("data/features")
    from_auto = pd.read_parquet(features / "auto.parquet").set_index("case_id")
    from_annotator = pd.read_parquet(features / "annotator.parquet").set_index("case_id")
    assert list(from_auto.index) == [c.case_id for c in cases]
    pd.testing.assert_frame_equal(from_auto, from_annotator)


@pytest.mark.parametrize("problem", ["missing", "empty"])
def test_a_missing_or_empty_case_fails_the_stage_naming_it(cohort, stage_params, caplog, problem):
    path = cohort / "external_masks" / "case_002.nii.gz"
    if problem == "missing":
        path.unlink()
    else:
        empty = read_mask(path, label=1) * 0
        write_image(empty, path)
    assert main(["segment", "--params", str(stage_params), "--no-tracking"]) == 1
    expected = ("case 'case_002': external mask .*case_002.nii.gz not found" if problem == "missing"
                else "case 'case_002': external mask .*case_002.nii.gz holds no voxel == 1")
    assert re.search(expected, caplog.text), caplog.text
    assert not Path("data/auto_masks").exists()  # nothing half-written


def test_external_requires_its_folder(cohort, stage_params, caplog, params_file):
    path = params_file({"data": {"cohort_dir": str(cohort), "mask_label": LABEL},
                        "segment": {"model": "external", "external": {"masks_dir": "nnunet_out", "label": 1}}})
    assert main(["segment", "--params", str(path), "--no-tracking"]) == 1
    assert "external masks folder" in caplog.text and "nnunet_out" in caplog.text
