"""Training loop, early stopping and the cross-validation driver on a tiny bright-sphere cohort."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from bonemet.config import ParamsError, PlanRequiredError, SegmentSpec, build_specs, load_params
from bonemet.data.io import ImageReadError, read_image, write_image
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
from bonemet.segmentation.inference import InferenceSettings
from bonemet.segmentation.missu import MISSU
from bonemet.segmentation.networks import network_from_spec
from bonemet.segmentation.training import EarlyStopping, TrainingConfigError, evaluate, make_loss, train_model
from bonemet.tracking.base import RecordingTracker

ROI = (16, 16, 16)
TINY_UNET = {"channels": (4, 8, 16), "strides": (2, 2), "num_res_units": 1}
TINY_MISSU = {
    "widths": (4, 8, 8, 8), "blocks": (1, 1, 1, 1), "embed_dim": 16, "num_layers": 1, "num_heads": 2,
    "mlp_dim": 16, "groups": 2, "stem_stride": 1,
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


#: params.yaml's segment spec (cpu profile) shrunk for these tests: the tiny UNet on 16^3 crops,
#: two epochs, one fold at a time, no test-time mirroring
SEG_CHANGES = {
    "model": "unet", "networks.unet": TINY_UNET, "roi_size": list(ROI), "parallel_folds": 1, "num_threads": 1,
    "train.max_epochs": 2, "train.batch_size": 2, "train.num_samples": 2, "train.lr": 0.05,
    "train.momentum": 0.9, "train.patience": 5, "train.val_overlap": None, "augment.rotate_prob": 0.0,
    "inference.overlap": 0.25, "inference.sw_batch_size": 2, "inference.mirror_axes": [],
    "train.max_steps": None, "train.converge_window": None,  # the epoch schedule unless a test sets a budget
}


@pytest.fixture(scope="module")
def seg(params) -> SegmentSpec:
    """params.yaml's segment spec shrunk for these tests (:data:`SEG_CHANGES`)."""
    return params.segment.updated(SEG_CHANGES)


@pytest.fixture
def cv_kwargs(params):
    """The keyword arguments of run_cross_validation that come from other params sections."""
    return {"seed": 0, "mask_label": params.data.mask_label, "grid_tolerance_mm": params.validation.grid_tolerance_mm,
            "num_threads": 1, "figure_dpi": params.evaluate.figure_dpi}


def _cv_spec(seg: SegmentSpec, tmp_path, masks: str = "auto_masks", work: str = "work", **changes) -> SegmentSpec:
    return seg.updated({"masks_dir": str(tmp_path / masks), "work_dir": str(tmp_path / work), **changes})


def _settings(params, spec: SegmentSpec) -> InferenceSettings:
    return InferenceSettings.from_params(params.preprocess, spec)


def test_early_stopping_counts_epochs_without_improvement():
    stopper = EarlyStopping(patience=3, min_delta=0.0)
    decisions = [stopper.step(v) for v in [1.0, 0.8, 0.9, 0.85, 0.81, 0.7]]
    assert decisions == [False, False, False, False, True, False]
    off = EarlyStopping(patience=None, min_delta=0.0)  # the budget decides; the best loss is still kept
    assert not any(off.step(v) for v in [1.0, 0.8] + [0.9] * 50) and off.best == 0.8 and off.bad_steps == 50


def test_early_stopping_min_delta_is_the_smallest_improvement():
    # with min_delta 0.05 a loss 0.03 lower is no improvement: 0.97 and 0.95 both count as bad epochs
    stopper = EarlyStopping(patience=2, min_delta=0.05)
    assert [stopper.step(v) for v in [1.0, 0.97, 0.95]] == [False, False, True]
    stopper = EarlyStopping(patience=2, min_delta=0.05)
    assert [stopper.step(v) for v in [1.0, 0.94, 0.92, 0.88]] == [False, False, False, False]
    with pytest.raises(TrainingConfigError, match="patience must be >= 1; found 0"):
        EarlyStopping(patience=0, min_delta=0.0)


def test_training_stops_after_patience(tmp_path, seg):
    cases = _make_cohort(tmp_path, 2)
    items = [load_volume(c) for c in cases]
    losses = iter([1.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1])
    dices = iter([0.1, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, 0.0])
    tracker = RecordingTracker()
    spec = seg.updated({"train.max_epochs": 8, "train.patience": 3, "train.num_samples": 1, "train.batch_size": 1})
    with tracker.run("t"):
        result = train_model(
            network_from_spec(spec), items[:1], items[1:], spec, seed=0, tracker=tracker,
            validate=lambda model, epoch: (next(losses), next(dices)),
        )
    assert len(result.history) == 5  # best loss at epoch 2, then 3 epochs without improvement
    assert result.stopped_early and result.best_epoch == 2 and result.best_val_dice == 0.5
    assert [s for s, _ in tracker.find("t")["metrics"]["val_loss"]] == [1, 2, 3, 4, 5]


def test_training_learns_bright_spheres(tmp_path, seg):
    cases = _make_cohort(tmp_path, 4)
    items = [load_volume(c) for c in cases]
    spec = seg.updated({"train.max_epochs": 12, "train.num_samples": 4, "train.batch_size": 4, "train.lr": 0.1,
                        "train.patience": 20})
    checkpoint = tmp_path / "best.pt"
    result = train_model(network_from_spec(spec), items[:3], items[3:], spec, seed=0, checkpoint_path=checkpoint)
    losses = [h["train_loss"] for h in result.history]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:2])
    assert result.best_val_dice > 0.3
    # the best checkpoint records its epoch, its Dice and the spec it was trained with
    import torch

    saved = torch.load(checkpoint, weights_only=False)
    assert saved["epoch"] == result.best_epoch and saved["val_dice"] == pytest.approx(result.best_val_dice)
    assert saved["spec"] == spec.model_dump(mode="json")
    assert SegmentSpec.model_validate(saved["spec"]).train == spec.train


def test_missu_distillation_path_trains(tmp_path, seg):
    cases = _make_cohort(tmp_path, 2)
    items = [load_volume(c) for c in cases]
    spec = seg.updated({"model": "missu", "train.max_epochs": 1, "distill_weight": 0.5,
                        **{f"networks.missu.{k}": v for k, v in TINY_MISSU.items()}})
    model = network_from_spec(spec)
    assert isinstance(model, MISSU) and model.fusion is not None
    result = train_model(model, items[:1], items[1:], spec, seed=0)
    assert np.isfinite(result.history[0]["train_loss"])


def test_cross_validation_writes_one_mask_per_case(tmp_path, params, seg, cv_kwargs):
    cases = _make_cohort(tmp_path, 6)
    folds = {c.case_id: i % 3 for i, c in enumerate(cases)}
    tracker = RecordingTracker()
    spec = _cv_spec(seg, tmp_path, val_fraction=0.25, **{"inference.mirror_axes": [2]})
    with tracker.run("segment"):
        result = run_cross_validation(cases, folds, spec, _settings(params, spec), tracker=tracker, **cv_kwargs)
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
        assert run["params"]["train"] == spec.train.model_dump(mode="json")
        assert run["params"]["inference"]["mirror_axes"] == [2]
    assert result.best_fold in (0, 1, 2) and result.best_model is not None
    assert (tmp_path / "work" / f"fold-{result.best_fold}.pt").is_file()


def test_failing_case_is_named_and_no_partial_output(tmp_path, params, seg, cv_kwargs):
    cases = _make_cohort(tmp_path, 4)
    (tmp_path / "raw" / "case-02_ct.nii.gz").write_bytes(b"corrupt")
    folds = {c.case_id: i % 2 for i, c in enumerate(cases)}
    spec = _cv_spec(seg, tmp_path, **{"train.max_epochs": 1})
    # the user's unreadable CT: the reader's error (a ValueError), naming the case
    with pytest.raises(ImageReadError, match="case 'case-02'") as info:
        run_cross_validation(cases, folds, spec, _settings(params, spec), **cv_kwargs)
    assert isinstance(info.value, ValueError)
    assert any("while segmenting case 'case-02'" in note for note in info.value.__notes__)
    assert not (tmp_path / "auto_masks").exists()


def test_automatic_masks_carry_the_mask_label(tmp_path, params, seg, cv_kwargs, monkeypatch):
    """With data.mask_label 2 the manual masks are read as label 2 and the automatic ones written as 2."""
    from bonemet.segmentation import cv

    cases = _make_cohort(tmp_path, 4)
    for case in cases:  # the raw manual masks store the lesion as 2
        mask = read_image(case.original_mask)
        write_image(sitk.Cast(mask * 2, sitk.sitkUInt8), case.original_mask)
    folds = {c.case_id: i % 2 for i, c in enumerate(cases)}

    def perfect(model, case, settings, *, device):  # the manual lesion as 0/1, as predict_case returns
        return sitk.Cast(read_image(case.original_mask) > 0, sitk.sitkUInt8)

    monkeypatch.setattr(cv, "predict_case", perfect)
    spec = _cv_spec(seg, tmp_path, **{"train.max_epochs": 1})
    result = run_cross_validation(cases, folds, spec, _settings(params, spec), only_folds=[1],
                                  **{**cv_kwargs, "mask_label": 2})
    for cid in ("case-01", "case-03"):
        written = sitk.GetArrayFromImage(read_image(tmp_path / "auto_masks" / f"{cid}.nii.gz"))
        assert set(np.unique(written)) == {0, 2}
    assert [r["dice"] for r in result.case_rows] == [1.0, 1.0]
    assert all(r["ref_volume_ml"] > 0 for r in result.case_rows)


def test_fold_checks_and_validation_split():
    cases = [SegCase(f"c{i}", None, None) for i in range(3)]  # type: ignore[arg-type]
    with pytest.raises(FoldAssignmentError, match="c2"):
        check_folds(cases, {"c0": 0, "c1": 1})
    train, val = split_validation([f"c{i}" for i in range(10)], 0.2, seed=1)
    assert len(val) == 2 and not set(train) & set(val) and len(train) == 8


def test_segment_stage_end_to_end(tmp_path, monkeypatch, params_file):
    """The stage with the repository's params (profile cpu), shrunk: outputs, MLflow runs, registry."""
    import argparse
    import json
    from pathlib import Path

    from bonemet.stages import segment

    cases = _make_cohort(tmp_path, 4)
    manifest = pd.DataFrame({
        "case_id": [c.case_id for c in cases], "label": [i % 2 for i in range(4)],
        "image": [c.original_image.name for c in cases], "mask": [c.original_mask.name for c in cases],
    })
    manifest.to_csv(tmp_path / "raw" / "manifest.csv", index=False)
    ids = [c.case_id for c in cases]
    (tmp_path / "splits.json").write_text(json.dumps({  # the split stage's file, as read_splits validates it
        "seed": 0, "test_size": 0.25, "n_folds": 2, "train": ids[:3], "test": ids[3:],
        "train_folds": {cid: i % 2 for i, cid in enumerate(ids[:3])}, "all_folds": {cid: i % 2 for i, cid in enumerate(ids)}}))
    tiny_unet = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_UNET.items()}
    params_file({
        "data": {"cohort_dir": str(tmp_path / "raw")},
        "preprocess": {"out_dir": str(tmp_path / "pre")}, "split": {"out": str(tmp_path / "splits.json")},
        "segment": {
            "model": "unet",
            "roi_size": list(ROI), "num_threads": 1, "gate": {"min_dice": 0.0},  # one epoch: no Dice to speak of
            "profiles": {"cpu": {"roi_size": list(ROI), "train": {"max_epochs": 1}, "networks": {"unet": tiny_unet}}},
        },
    })
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    args = argparse.Namespace(params="params.yaml", profile=None, folds=None, model=None, no_register=False,
                              no_tracking=False)
    assert segment.run(args) == 0

    assert sorted(p.name for p in Path("data/auto_masks").glob("*.nii.gz")) == sorted(
        f"{c.case_id}.nii.gz" for c in cases)
    summary = json.loads(Path("metrics/segmentation.json").read_text())
    assert summary["n_cases"] == 4 and 0.0 <= summary["dice_mean"] <= 1.0 and summary["profile"] == "cpu"
    bias = summary["bias"]  # the class-dependent error: two cases of each label, no plan here (no quartiles)
    assert {k: v["n"] for k, v in bias["by_label"].items()} == {"0": 2, "1": 2} and bias["max_dice_gap"] == 0.05
    assert bias["label_dice_gap"] == pytest.approx(bias["by_label"]["1"]["dice_mean"] - bias["by_label"]["0"]["dice_mean"])
    assert len(pd.read_csv("metrics/segmentation_cases.csv")) == 4
    assert sorted(p.name for p in Path("plots/segmentation/curves").glob("*.csv")) == ["fold-0.csv", "fold-1.csv"]
    assert Path("plots/segmentation/curves.png").is_file()

    from bonemet.registry.store import alias_version, client, load_model

    store = client(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}", "mlruns")
    assert alias_version(store, "bonemet-segmenter", "staging") == "1"
    assert summary["gate"]["promote"] is True
    model = load_model(store, "models:/bonemet-segmenter@staging", flavor="pytorch")
    import torch

    assert tuple(model.eval()(torch.zeros(1, 1, *ROI)).shape) == (1, 2, *ROI)


def test_only_folds_runs_a_subset(tmp_path, params, seg, cv_kwargs):
    cases = _make_cohort(tmp_path, 4)
    folds = {c.case_id: i % 2 for i, c in enumerate(cases)}
    tracker = RecordingTracker()
    spec = _cv_spec(seg, tmp_path, **{"train.max_epochs": 1})
    with tracker.run("segment"):
        run_cross_validation(cases, folds, spec, _settings(params, spec), tracker=tracker, only_folds=[1],
                             **cv_kwargs)
    assert sorted(p.name for p in (tmp_path / "auto_masks").glob("*.nii.gz")) == ["case-01.nii.gz", "case-03.nii.gz"]
    assert [r["name"] for r in tracker.runs if r["parent"] == "segment"] == ["fold-1"]


def test_precomputed_crop_indices_pad_and_give_the_same_kind_of_crops(params):
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
    augment = params.segment.augment.updated({"pos": 1.0, "neg": 0.0})
    transform = train_transforms(ROI, augment, num_samples=4, seed=0, indexed=True)
    crops = transform(dict(item))
    assert len(crops) == 4
    for crop in crops:
        assert tuple(crop["image"].shape) == (1, *ROI)
        assert float(crop["label"].sum()) > 0  # pos only: every crop holds lesion


def test_validation_windows_follow_the_spec(seg, monkeypatch):
    """val_overlap null: the validation windows overlap like inference's; validation never mirrors;
    val_mode crops: one roi-sized crop per case."""
    import torch

    from bonemet.segmentation import training

    seen = []

    def windows(model, image, roi_size, *, overlap, sw_batch_size, device, mirror_axes, channels_last, mode="gaussian"):
        seen.append((tuple(image.shape), tuple(roi_size), overlap, sw_batch_size, tuple(mirror_axes)))
        return torch.zeros(1, 2, *image.shape[1:])

    monkeypatch.setattr(training, "sliding_window_logits", windows)
    item = {"image": np.zeros((1, 20, 24, 24), np.float32), "label": np.zeros((1, 20, 24, 24), np.float32)}
    spec = seg.updated({"train.val_overlap": None, "inference.overlap": 0.4, "inference.mirror_axes": [0, 1, 2]})
    loss_fn = make_loss(spec.train)
    assert evaluate(None, [item], spec, loss_fn, "cpu")[1] == 1.0  # empty vs empty
    evaluate(None, [item], spec.updated({"train.val_overlap": 0.0}), loss_fn, "cpu")
    evaluate(None, [item], spec.updated({"train.val_mode": "crops"}), loss_fn, "cpu")
    assert seen == [
        ((1, 20, 24, 24), ROI, 0.4, 2, ()),
        ((1, 20, 24, 24), ROI, 0.0, 2, ()),
        ((1, *ROI), ROI, 0.4, 2, ()),
    ]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"train.val_overlap": 1.0}, r"train.val_overlap: Input should be less than 1; found 1.0"),
        ({"inference.mirror_axes": [1, 1]}, r"inference.mirror_axes: must be distinct spatial axes.*\[1, 1\]"),
        ({"inference.mirror_axes": [3]}, r"inference.mirror_axes: must be distinct spatial axes"),
        ({"train.num_workers": -1}, r"train.num_workers: Input should be greater than or equal to 0; found -1"),
        ({"train.lr_schedule": "step"}, r"train.lr_schedule: Input should be 'poly', 'cosine' or 'constant'"),
        ({"train.patience": 0}, r"train.patience: Input should be greater than or equal to 1"),
        ({"augment.pos": 0.0, "augment.neg": 0.0}, r"augment: pos \+ neg must be > 0"),
        ({"train.lrr": 0.1}, r"train.lrr: unknown key; did you mean lr\?"),
    ],
)
def test_segment_spec_refuses_bad_settings_naming_the_key(seg, changes, message):
    with pytest.raises(ParamsError, match=message):
        seg.updated(changes)


def test_segment_spec_normalises_mirror_axes_and_keeps_val_overlap_null(seg):
    assert seg.updated({"inference.mirror_axes": [2, 0]}).inference.mirror_axes == (0, 2)
    assert seg.train.val_overlap is None and seg.updated({"train.val_overlap": 0.0}).train.val_overlap == 0.0


def test_a_misspelt_training_key_in_params_is_an_error_with_a_suggestion():
    """Unknown keys are no longer ignored: in the common keys or in a profile, with the full path."""
    from pathlib import Path

    raw = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    raw["segment"]["train"]["lrr"] = 0.1
    with pytest.raises(ParamsError, match=r"segment.train.lrr: unknown key; did you mean lr\?"):
        build_specs(raw)
    raw = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    raw["segment"]["profiles"]["cpu"]["train"]["patiense"] = 3
    with pytest.raises(ParamsError, match=r"segment.profiles.cpu.train.patiense: unknown key; did you mean patience\?"):
        build_specs(raw)


def test_parallel_folds_match_sequential_and_replay_fold_runs_in_order(tmp_path, params, seg, cv_kwargs):
    cases = _make_cohort(tmp_path, 6)
    folds = {c.case_id: i % 3 for i, c in enumerate(cases)}
    outcomes = {}
    for parallel in (1, 2):
        tracker = RecordingTracker()
        spec = _cv_spec(seg, tmp_path, f"masks-{parallel}", f"work-{parallel}", val_fraction=0.25,
                        parallel_folds=parallel)
        with tracker.run("segment"):
            outcomes[parallel] = (run_cross_validation(cases, folds, spec, _settings(params, spec), tracker=tracker,
                                                       **cv_kwargs), tracker)
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


def test_parallel_fold_failure_names_the_case(tmp_path, params, seg, cv_kwargs):
    cases = _make_cohort(tmp_path, 4)
    folds = {c.case_id: i % 2 for i, c in enumerate(cases)}
    (tmp_path / "raw" / "case-02_ct.nii.gz").write_bytes(b"corrupt")  # its original CT: inference fails
    spec = _cv_spec(seg, tmp_path, "masks", **{"train.max_epochs": 1, "val_fraction": 0.25, "parallel_folds": 2})
    with pytest.raises(ImageReadError, match="case 'case-02'"):
        run_cross_validation(cases, folds, spec, _settings(params, spec), **cv_kwargs)
    assert not (tmp_path / "masks").exists()


def test_training_without_cases_is_refused(seg):
    with pytest.raises(TrainingConfigError, match="no training cases"):
        train_model(network_from_spec(seg), [], [], seg, seed=0)


# --- schedules: a step budget, convergence, patience; resuming a killed fold ---------------------


def _seeded_network(spec):
    torch.manual_seed(0)
    return network_from_spec(spec)


def _scripted(dices):
    """A validation that scripts the Dice per epoch and a falling loss (patience never runs out)."""
    return lambda model, epoch: (1.0 / epoch, dices(epoch))


def test_a_step_budget_fixes_the_epochs_and_anneals_the_learning_rate_over_them(tmp_path, seg):
    items = [load_volume(c) for c in _make_cohort(tmp_path, 4)]
    spec = seg.updated({"train.max_epochs": 50, "train.num_samples": 1, "train.batch_size": 2,
                        "train.converge_window": None, "train.lr_schedule": "poly", "train.poly_power": 1.0,
                        "train.max_steps": 11})
    # three training cases in batches of two: 2 steps per epoch; 11 steps need 6 epochs (12 steps)
    result = train_model(network_from_spec(spec), items[:3], items[3:], spec, seed=0,
                         validate=_scripted(lambda e: 0.1 * e))
    assert result.stop_reason == "budget" and result.planned_epochs == 6 and len(result.history) == 6
    assert result.steps == 12
    lrs = [h["lr"] for h in result.history]
    assert lrs[0] == pytest.approx(spec.train.lr) and lrs[-1] == pytest.approx(spec.train.lr / 6, rel=1e-3)
    # no clock decides anything: the history holds no times, and a rerun gives the same weights
    assert all(set(h) == {"epoch", "train_loss", "val_loss", "val_dice", "lr"} for h in result.history)
    first, again = (train_model(_seeded_network(spec), items[:3], items[3:], spec, seed=0,
                                validate=_scripted(lambda e: 0.1 * e)) for _ in range(2))
    for (name, a), b in zip(first.model.state_dict().items(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # without a budget the same settings run the epoch schedule to its end
    epochs = train_model(network_from_spec(spec), items[:3], items[3:],
                         spec.updated({"train.max_epochs": 4, "train.max_steps": None}), seed=0,
                         validate=_scripted(lambda e: 0.1 * e))
    assert epochs.stop_reason == "max_epochs" and len(epochs.history) == 4 and epochs.planned_epochs == 4


def test_a_step_budget_below_one_epoch_is_refused_and_one_beyond_max_epochs_is_capped(tmp_path, seg, caplog):
    items = [load_volume(c) for c in _make_cohort(tmp_path, 4)]
    spec = seg.updated({"train.batch_size": 1, "train.num_samples": 1, "train.max_steps": 2})
    with pytest.raises(TrainingConfigError, match=r"segment.train.max_steps 2 is less than one epoch \(3 optimiser"):
        train_model(network_from_spec(spec), items[:3], items[3:], spec, seed=0)
    capped = spec.updated({"train.max_steps": 30, "train.max_epochs": 2})
    with caplog.at_level("WARNING"):
        result = train_model(network_from_spec(capped), items[:3], items[3:], capped, seed=0,
                             validate=_scripted(lambda e: 0.1 * e))
    assert result.planned_epochs == 2 and result.stop_reason == "max_epochs"
    assert "needs 10 epochs of 3 steps, more than segment.train.max_epochs 2" in caplog.text
    with pytest.raises(PlanRequiredError, match=r"segment.train.max_steps: 'auto' \(from the plan\) reached train_model unresolved"):
        train_model(network_from_spec(spec), items[:3], items[3:], spec.updated({"train.max_steps": "auto"}), seed=0)


def test_a_flat_validation_dice_stops_as_converged_and_a_rising_loss_as_patience(tmp_path, seg):
    items = [load_volume(c) for c in _make_cohort(tmp_path, 2)]
    spec = seg.updated({"train.max_epochs": 40, "train.num_samples": 1, "train.batch_size": 1,
                        "train.converge_window": 4, "train.converge_tol": 0.01, "train.patience": 30,
                        "train.max_steps": 1000})
    # Dice rises to 0.6 at epoch 5, then stays within 0.005: converged after 4 flat epochs (epoch 9)
    flat = train_model(network_from_spec(spec), items[:1], items[1:], spec, seed=0,
                       validate=_scripted(lambda e: min(e, 5) * 0.12 - 0.005 * (e > 5)))
    assert flat.stop_reason == "converged" and len(flat.history) == 9 and flat.best_epoch == 5
    assert flat.stopped_early
    # a Dice flat at 0 (no validation lesion found yet) is not convergence: it trains its budget
    unstarted = train_model(network_from_spec(spec), items[:1], items[1:], spec.updated({"train.max_epochs": 8}), seed=0,
                            validate=_scripted(lambda e: 0.0))
    assert unstarted.stop_reason == "max_epochs" and len(unstarted.history) == 8
    losses = iter([1.0, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4])
    patience = train_model(network_from_spec(spec), items[:1], items[1:], spec.updated({"train.patience": 3}), seed=0,
                           validate=lambda model, epoch: (next(losses), 0.1 * epoch))
    assert patience.stop_reason == "patience" and len(patience.history) == 5


def test_cross_validation_logs_each_folds_steps_and_stop_reason(tmp_path, params, seg, cv_kwargs):
    cases = _make_cohort(tmp_path, 6)
    folds = {c.case_id: i % 3 for i, c in enumerate(cases)}
    spec = _cv_spec(seg, tmp_path, **{"train.max_steps": 2, "parallel_folds": 2, "train.max_epochs": 2})
    tracker = RecordingTracker()
    with tracker.run("segment"):
        result = run_cross_validation(cases, folds, spec, _settings(params, spec), tracker=tracker, only_folds=[1],
                                      **cv_kwargs)
    (fold,) = result.folds
    # four cases outside fold 1, one held out for validation: 3 cases in batches of 2 = 2 steps an epoch
    summary = fold.summary()
    assert summary["stop_reason"] == "budget" == fold.stop_reason and summary["steps"] == 2 == fold.steps
    assert not {"train_seconds", "budget_s", "resumed_from"} & set(summary)  # times and history: MLflow's
    run = tracker.find("fold-1")
    assert run["tags"]["stop_reason"] == "budget" and run["metrics"]["steps"][-1][1] == 2
    assert "train_seconds" in run["metrics"]
    assert not list((tmp_path / "work").glob("*.resume.pt"))  # a finished run leaves nothing to resume


RESUME_CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
import planned
from test_seg_training import SEG_CHANGES, _make_cohort
from bonemet.segmentation.cv import run_cross_validation
from bonemet.segmentation.inference import InferenceSettings

root = {root!r}
params = planned.load()
spec = params.segment.updated({{**SEG_CHANGES, "train.max_epochs": 25, "train.patience": 100,
                               "train.converge_window": None, "masks_dir": root + "/masks", "work_dir": root + "/work"}})
cases = _make_cohort(__import__("pathlib").Path(root), 6)
folds = {{c.case_id: i % 3 for i, c in enumerate(cases)}}
result = run_cross_validation(cases, folds, spec, InferenceSettings.from_params(params.preprocess, spec), seed=0,
                              mask_label=1, grid_tolerance_mm=params.validation.grid_tolerance_mm, num_threads=1,
                              figure_dpi=40, only_folds=[0])
(fold,) = result.folds
json.dump({{**fold.summary(), "resumed_from": fold.resumed_from, "epochs_seen": [h["epoch"] for h in fold.history],
           "val_dice": [h["val_dice"] for h in fold.history]}}, open(root + "/result.json", "w"))
"""


@pytest.mark.slow
def test_a_fold_killed_mid_training_resumes_from_its_last_checkpoint(tmp_path):
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import torch

    from bonemet.segmentation.cv import resume_path

    tests = str(Path(__file__).resolve().parent)
    env = {**os.environ, "PYTHONUTF8": "1", "BONEMET_PROGRESS": "0"}

    def child(root: Path) -> subprocess.Popen:
        root.mkdir(exist_ok=True)
        return subprocess.Popen([sys.executable, "-c", RESUME_CHILD.format(tests=tests, root=str(root))], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    killed = tmp_path / "killed"
    proc = child(killed)
    state_file = resume_path(killed / "work", 0)
    deadline = time.monotonic() + 300
    epoch = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if state_file.is_file():
            epoch = torch.load(state_file, weights_only=True)["epoch"]
            if epoch >= 3:
                break
        time.sleep(0.05)
    assert proc.poll() is None, f"the fold finished before it could be killed: {proc.stderr.read()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = torch.load(state_file, weights_only=True)  # whole: the kill never leaves half a checkpoint
    assert 3 <= saved["epoch"] < 25 and not saved["finished"]
    assert not (killed / "result.json").exists() and not (killed / "masks").exists()

    rerun = child(killed)
    assert rerun.wait(timeout=600) == 0, rerun.stderr.read()[-3000:]
    resumed = json.loads((killed / "result.json").read_text())
    assert resumed["resumed_from"] >= saved["epoch"] and resumed["epochs"] == 25
    assert resumed["epochs_seen"] == list(range(1, 26))  # the history before the kill kept, none repeated
    assert resumed["stop_reason"] == "max_epochs" and not state_file.exists()
    assert len(list((killed / "masks").glob("*.nii.gz"))) == 2  # fold 0's out-of-fold masks

    fresh = tmp_path / "fresh"
    assert child(fresh).wait(timeout=600) == 0
    uninterrupted = json.loads((fresh / "result.json").read_text())
    assert uninterrupted["epochs"] == resumed["epochs"] and uninterrupted["resumed_from"] == 0
    # every epoch's crops are seeded by (seed, epoch) and the whole state was restored: the same training
    assert resumed["val_dice"] == pytest.approx(uninterrupted["val_dice"], abs=1e-6)

