"""Training loop, early stopping and the cross-validation driver on a tiny bright-sphere cohort."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from bonemet.data.io import read_image, write_image
from bonemet.segmentation.cv import FoldAssignmentError, check_folds, run_cross_validation, split_validation
from bonemet.segmentation.data import (
    BG_INDICES,
    FG_INDICES,
    SegCase,
    load_cases,
    load_volume,
    train_transforms,
    with_crop_indices,
)
from bonemet.segmentation.networks import build_network
from bonemet.segmentation.training import EarlyStopping, TrainConfig, TrainingConfigError, train_model
from bonemet.tracking.base import RecordingTracker

ROI = (16, 16, 16)
TINY_UNET = {"channels": (4, 8, 16), "strides": (2, 2), "num_res_units": 1}
TINY_MISSU = {
    "widths": (4, 8, 8, 8), "blocks": (1, 1, 1, 1), "embed_dim": 16, "num_layers": 1, "num_heads": 2,
    "mlp_dim": 16, "groups": 2,
}


def _make_cohort(root, n_cases: int, seed: int = 0) -> list[SegCase]:
    """Raw CTs (HU, anisotropic grid) with a bright sphere lesion, and preprocessed crops ([0, 1])."""
    rng = np.random.default_rng(seed)
    raw, pre = root / "raw", root / "pre"
    rows = []
    for i in range(n_cases):
        cid = f"case-{i:02d}"
        shape = (14, 26, 26)  # z, y, x
        zz, yy, xx = np.indices(shape)
        c = (7 + rng.integers(-1, 2), 13 + rng.integers(-3, 4), 13 + rng.integers(-3, 4))
        r = rng.uniform(3.0, 4.5)
        lesion = ((zz - c[0]) ** 2 * 2.0**2 + ((yy - c[1]) ** 2 + (xx - c[2]) ** 2) * 1.2**2) <= (r * 1.2) ** 2
        hu = rng.normal(100.0, 60.0, shape).astype(np.float32)
        hu[lesion] += 900.0
        ct = sitk.GetImageFromArray(hu)
        ct.SetSpacing((1.2, 1.2, 2.0))
        ct.SetOrigin((-15.0, -15.0, float(i)))
        mask = sitk.GetImageFromArray(lesion.astype(np.uint8))
        mask.CopyInformation(ct)
        write_image(ct, raw / f"{cid}_ct.nii.gz")
        write_image(mask, raw / f"{cid}_mask.nii.gz")
        # "Preprocessed": crop keeping physical geometry, window [-200, 1800] HU -> [0, 1].
        size, index = (22, 22, 12), (2, 2, 1)
        img = sitk.RegionOfInterest(ct, size, index)
        img = sitk.Cast(sitk.Clamp((img + 200.0) / 2000.0, lowerBound=0.0, upperBound=1.0), sitk.sitkFloat32)
        write_image(img, pre / f"{cid}_image.nii.gz")
        write_image(sitk.RegionOfInterest(mask, size, index), pre / f"{cid}_mask.nii.gz")
        rows.append({"case_id": cid, "label": i % 2, "image": f"{cid}_image.nii.gz", "mask": f"{cid}_mask.nii.gz"})
    pd.DataFrame(rows).to_csv(pre / "cases.csv", index=False)
    originals = {r["case_id"]: (raw / f"{r['case_id']}_ct.nii.gz", raw / f"{r['case_id']}_mask.nii.gz") for r in rows}
    return load_cases(pre, originals)


def _config(**kw) -> TrainConfig:
    base = dict(
        roi_size=ROI, max_epochs=2, batch_size=2, num_samples=2, lr=0.05, momentum=0.9, patience=5,
        overlap=0.25, sw_batch_size=2, rotate_prob=0.0, seed=0, num_threads=1,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_early_stopping_counts_epochs_without_improvement():
    stopper = EarlyStopping(patience=3)
    decisions = [stopper.step(v) for v in [1.0, 0.8, 0.9, 0.85, 0.81, 0.7]]
    assert decisions == [False, False, False, False, True, False]


def test_training_stops_after_patience(tmp_path):
    cases = _make_cohort(tmp_path, 2)
    items = [load_volume(c) for c in cases]
    losses = iter([1.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1])
    dices = iter([0.1, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, 0.0])
    tracker = RecordingTracker()
    with tracker.run("t"):
        result = train_model(
            build_network("unet", roi_size=ROI, **TINY_UNET), items[:1], items[1:],
            _config(max_epochs=8, patience=3, num_samples=1, batch_size=1), tracker,
            validate=lambda model, epoch: (next(losses), next(dices)),
        )
    assert len(result.history) == 5  # best loss at epoch 2, then 3 epochs without improvement
    assert result.stopped_early and result.best_epoch == 2 and result.best_val_dice == 0.5
    assert [s for s, _ in tracker.find("t")["metrics"]["val_loss"]] == [1, 2, 3, 4, 5]


def test_training_learns_bright_spheres(tmp_path):
    cases = _make_cohort(tmp_path, 4)
    items = [load_volume(c) for c in cases]
    result = train_model(
        build_network("unet", roi_size=ROI, **TINY_UNET), items[:3], items[3:],
        _config(max_epochs=12, num_samples=4, batch_size=4, lr=0.1, patience=20), None,
    )
    losses = [h["train_loss"] for h in result.history]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:2])
    assert result.best_val_dice > 0.3


def test_missu_distillation_path_trains(tmp_path):
    cases = _make_cohort(tmp_path, 2)
    items = [load_volume(c) for c in cases]
    result = train_model(
        build_network("missu", roi_size=ROI, **TINY_MISSU), items[:1], items[1:],
        _config(max_epochs=1, distill_weight=0.5), None,
    )
    assert np.isfinite(result.history[0]["train_loss"])


def test_cross_validation_writes_one_mask_per_case(tmp_path):
    cases = _make_cohort(tmp_path, 6)
    folds = {c.case_id: i % 3 for i, c in enumerate(cases)}
    tracker = RecordingTracker()
    with tracker.run("segment"):
        result = run_cross_validation(
            cases, folds, lambda: build_network("unet", roi_size=ROI, **TINY_UNET),
            _config(max_epochs=2, mirror_axes=(2,)), tmp_path / "auto_masks", tmp_path / "work", tracker,
            val_fraction=0.25,
        )
    written = sorted(p.name for p in (tmp_path / "auto_masks").glob("*.nii.gz"))
    assert written == sorted(f"{c.case_id}.nii.gz" for c in cases)
    for case in cases:
        mask = read_image(tmp_path / "auto_masks" / f"{case.case_id}.nii.gz")
        original = read_image(case.original_image)
        assert mask.GetSize() == original.GetSize() and mask.GetSpacing() == original.GetSpacing()
        assert set(np.unique(sitk.GetArrayViewFromImage(mask))) <= {0, 1}
    assert sorted(r["case_id"] for r in result.case_rows) == sorted(folds)
    assert all("dice" in r and "hd95_mm" in r for r in result.case_rows)
    fold_runs = [r for r in tracker.runs if r["parent"] == "segment"]
    assert [r["name"] for r in fold_runs] == ["fold-0", "fold-1", "fold-2"]
    for run in fold_runs:
        assert [s for s, _ in run["metrics"]["val_dice"]] == [1, 2]
        assert len(run["metrics"]["train_loss"]) == 2
        assert "curves/fold-" + run["name"][-1] + "_curves.png" in run["artifacts"]
    assert result.best_fold in (0, 1, 2) and result.best_model is not None


def test_failing_case_is_named_and_no_partial_output(tmp_path):
    cases = _make_cohort(tmp_path, 4)
    (tmp_path / "raw" / "case-02_ct.nii.gz").write_bytes(b"corrupt")
    folds = {c.case_id: i % 2 for i, c in enumerate(cases)}
    with pytest.raises(ValueError, match="case-02"):
        run_cross_validation(
            cases, folds, lambda: build_network("unet", roi_size=ROI, **TINY_UNET), _config(max_epochs=1),
            tmp_path / "auto_masks", tmp_path / "work", None,
        )
    assert not (tmp_path / "auto_masks").exists()


def test_fold_checks_and_validation_split():
    cases = [SegCase(f"c{i}", None, None) for i in range(3)]  # type: ignore[arg-type]
    with pytest.raises(FoldAssignmentError, match="c2"):
        check_folds(cases, {"c0": 0, "c1": 1})
    train, val = split_validation([f"c{i}" for i in range(10)], 0.2, seed=1)
    assert len(val) == 2 and not set(train) & set(val) and len(train) == 8


def test_segment_stage_end_to_end(tmp_path, monkeypatch):
    """The stage with the repository's params (profile cpu), shrunk: outputs, MLflow runs, registry."""
    import argparse
    import json
    from pathlib import Path

    import yaml

    from bonemet.stages import segment

    cases = _make_cohort(tmp_path, 4)
    manifest = pd.DataFrame({
        "case_id": [c.case_id for c in cases], "label": [i % 2 for i in range(4)],
        "image": [c.original_image.name for c in cases], "mask": [c.original_mask.name for c in cases],
    })
    manifest.to_csv(tmp_path / "raw" / "manifest.csv", index=False)
    (tmp_path / "splits.json").write_text(json.dumps({"all_folds": {c.case_id: i % 2 for i, c in enumerate(cases)}}))
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["data"]["cohort_dir"] = str(tmp_path / "raw")
    seg = params["segment"]
    seg.update({"preprocessed_dir": str(tmp_path / "pre"), "splits": str(tmp_path / "splits.json"),
                "model": "unet", "roi_size": list(ROI), "num_threads": 1})
    seg["profiles"]["cpu"].update({"roi_size": list(ROI), "train": {**seg["profiles"]["cpu"]["train"], "max_epochs": 1}})
    seg["profiles"]["cpu"]["networks"]["unet"] = {k: list(v) for k, v in TINY_UNET.items() if k != "num_res_units"}
    seg["profiles"]["cpu"]["networks"]["unet"]["num_res_units"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    args = argparse.Namespace(params="params.yaml", profile=None, folds=None, model=None, no_register=False)
    assert segment.run(args) == 0

    assert sorted(p.name for p in Path("data/auto_masks").glob("*.nii.gz")) == sorted(
        f"{c.case_id}.nii.gz" for c in cases)
    summary = json.loads(Path("metrics/segmentation.json").read_text())
    assert summary["n_cases"] == 4 and 0.0 <= summary["dice_mean"] <= 1.0 and summary["profile"] == "cpu"
    assert len(pd.read_csv("metrics/segmentation_cases.csv")) == 4
    assert sorted(p.name for p in Path("plots/segmentation/curves").glob("*.csv")) == ["fold-0.csv", "fold-1.csv"]
    assert Path("plots/segmentation/curves.png").is_file()

    from bonemet.tracking.mlflow_backend import alias_version, load_model

    assert alias_version("bonemet-missu", "staging") == "1"
    model = load_model("models:/bonemet-missu@staging", flavor="pytorch")
    import torch

    assert tuple(model.eval()(torch.zeros(1, 1, *ROI)).shape) == (1, 2, *ROI)


def test_only_folds_runs_a_subset(tmp_path):
    cases = _make_cohort(tmp_path, 4)
    folds = {c.case_id: i % 2 for i, c in enumerate(cases)}
    tracker = RecordingTracker()
    with tracker.run("segment"):
        run_cross_validation(
            cases, folds, lambda: build_network("unet", roi_size=ROI, **TINY_UNET), _config(max_epochs=1),
            tmp_path / "auto_masks", tmp_path / "work", tracker, only_folds=[1],
        )
    assert sorted(p.name for p in (tmp_path / "auto_masks").glob("*.nii.gz")) == ["case-01.nii.gz", "case-03.nii.gz"]
    assert [r["name"] for r in tracker.runs if r["parent"] == "segment"] == ["fold-1"]


def test_precomputed_crop_indices_pad_and_give_the_same_kind_of_crops():
    rng = np.random.default_rng(0)
    image = rng.uniform(0.1, 1.0, (1, 12, 20, 20)).astype(np.float32)
    image[:, :, :2] = 0.0  # outside the body: never a background crop centre
    label = np.zeros_like(image)
    label[:, 5:8, 9:12, 9:12] = 1.0
    item = with_crop_indices({"image": image, "label": label}, ROI)
    assert item["image"].shape == (1, 16, 20, 20) and item["label"].shape == (1, 16, 20, 20)
    assert len(item[FG_INDICES]) == 27
    padded = item["label"][0].ravel()
    assert (padded[item[FG_INDICES]] == 1).all() and (padded[item[BG_INDICES]] == 0).all()
    assert (item["image"][0].ravel()[item[BG_INDICES]] > 0).all()
    transform = train_transforms(ROI, pos=1.0, neg=0.0, num_samples=4, seed=0, indexed=True)
    crops = transform(dict(item))
    assert len(crops) == 4
    for crop in crops:
        assert tuple(crop["image"].shape) == (1, *ROI)
        assert float(crop["label"].sum()) > 0  # pos only: every crop holds lesion


def test_val_overlap_defaults_to_overlap_and_is_range_checked():
    assert TrainConfig().val_overlap is None
    assert TrainConfig(val_overlap=0.0).val_overlap == 0.0
    with pytest.raises(ValueError, match=r"val_overlap must be in \[0, 1\) or null; found 1.0"):
        TrainConfig(val_overlap=1.0)


def test_mirror_axes_are_checked_and_normalised():
    assert TrainConfig().mirror_axes == ()
    assert TrainConfig(mirror_axes=[2, 0]).mirror_axes == (0, 2)
    with pytest.raises(TrainingConfigError, match=r"mirror_axes must be distinct spatial axes.*\[1, 1\]"):
        TrainConfig(mirror_axes=[1, 1])


def test_parallel_folds_match_sequential_and_replay_fold_runs_in_order(tmp_path):
    cases = _make_cohort(tmp_path, 6)
    folds = {c.case_id: i % 3 for i, c in enumerate(cases)}
    outcomes = {}
    for parallel in (1, 2):
        tracker = RecordingTracker()
        with tracker.run("segment"):
            outcomes[parallel] = (run_cross_validation(
                cases, folds, lambda: build_network("unet", roi_size=ROI, **TINY_UNET), _config(max_epochs=2),
                tmp_path / f"masks-{parallel}", tmp_path / f"work-{parallel}", tracker, val_fraction=0.25,
                parallel_folds=parallel,
            ), tracker)
    (seq, seq_tracker), (par, par_tracker) = outcomes[1], outcomes[2]
    # one thread per fold either way (num_threads=1): the same numbers, the same masks
    assert [r["case_id"] for r in par.case_rows] == [r["case_id"] for r in seq.case_rows]
    np.testing.assert_allclose([r["dice"] for r in par.case_rows], [r["dice"] for r in seq.case_rows])
    for case in cases:
        a = sitk.GetArrayFromImage(read_image(tmp_path / "masks-1" / f"{case.case_id}.nii.gz"))
        b = sitk.GetArrayFromImage(read_image(tmp_path / "masks-2" / f"{case.case_id}.nii.gz"))
        np.testing.assert_array_equal(a, b)
    assert par.best_fold == seq.best_fold and par.best_model is not None
    assert not par.best_model.training
    # the workers' tracker calls are replayed as nested runs, in fold order, with every epoch
    fold_runs = [r for r in par_tracker.runs if r["parent"] == "segment"]
    assert [r["name"] for r in fold_runs] == ["fold-0", "fold-1", "fold-2"]
    for run, ref in zip(fold_runs, [r for r in seq_tracker.runs if r["parent"] == "segment"], strict=True):
        assert run["params"] == ref["params"]
        assert [s for s, _ in run["metrics"]["val_dice"]] == [1, 2]
        assert run["artifacts"] == ref["artifacts"]
    assert par.best_run_id == seq.best_run_id  # RecordingTracker ids follow the run order


def test_parallel_fold_failure_names_the_case(tmp_path):
    cases = _make_cohort(tmp_path, 4)
    folds = {c.case_id: i % 2 for i, c in enumerate(cases)}
    (tmp_path / "raw" / "case-02_ct.nii.gz").write_bytes(b"corrupt")  # its original CT: inference fails
    with pytest.raises(ValueError, match="case-02"):
        run_cross_validation(
            cases, folds, lambda: build_network("unet", roi_size=ROI, **TINY_UNET), _config(max_epochs=1),
            tmp_path / "masks", tmp_path / "work", val_fraction=0.25, parallel_folds=2,
        )
    assert not (tmp_path / "masks").exists()


def test_num_workers_is_checked():
    assert TrainConfig().num_workers == 0
    with pytest.raises(TrainingConfigError, match="num_workers must be >= 0; found -1"):
        TrainConfig(num_workers=-1)
