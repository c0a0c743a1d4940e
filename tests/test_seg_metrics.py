"""Segmentation metrics on hand-made masks with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from bonemet.data import masks
from bonemet.segmentation.metrics import MaskGridError, case_metrics, dice, hd95, summarize

TOL = 0.01  # mm: params validate.grid_tolerance_mm


def _sphere(shape, center, radius):
    zz, yy, xx = np.indices(shape)
    return ((zz - center[0]) ** 2 + (yy - center[1]) ** 2 + (xx - center[2]) ** 2 <= radius**2).astype(np.uint8)


def _image(arr, spacing=(1.0, 1.0, 1.0)):
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(spacing)
    return img


def test_identical_masks_dice_one_hd95_zero():
    mask = _sphere((20, 20, 20), (10, 10, 10), 5)
    assert dice(mask, mask) == 1.0
    assert hd95(mask, mask, (1.0, 1.0, 1.0)) == 0.0


def test_cubes_with_known_overlap():
    a = np.zeros((20, 20, 20), np.uint8)
    b = np.zeros_like(a)
    a[5:15, 5:15, 5:15] = 1  # 1000 voxels
    b[5:15, 5:15, 8:18] = 1  # shifted by 3 along x: overlap 10*10*7 = 700
    assert dice(a, b) == pytest.approx(2 * 700 / 2000)
    # Every surface distance is at most 3 voxels; on the shifted faces exactly 3.
    assert hd95(a, b, (1.0, 1.0, 1.0)) == pytest.approx(3.0)
    # Physical spacing: 2 mm along x -> 6 mm.
    assert hd95(a, b, (1.0, 1.0, 2.0)) == pytest.approx(6.0)


def test_offset_spheres_dice_matches_voxel_count():
    a = _sphere((30, 30, 30), (15, 15, 12), 6)
    b = _sphere((30, 30, 30), (15, 15, 18), 6)
    inter = int((a & b).sum())
    assert 0 < inter < a.sum()
    assert dice(a, b) == pytest.approx(2 * inter / (a.sum() + b.sum()))
    h = hd95(a, b, (1.0, 1.0, 1.0))
    assert 0 < h <= 6.0 + 1e-6  # centres 6 voxels apart bound every surface distance


def test_empty_prediction_is_flagged():
    ref = _sphere((16, 16, 16), (8, 8, 8), 4)
    empty = np.zeros_like(ref)
    assert dice(empty, ref) == 0.0
    assert math.isinf(hd95(empty, ref, (1, 1, 1)))
    assert math.isnan(hd95(empty, empty, (1, 1, 1)))
    row = case_metrics(_image(empty), _image(ref), case_id="c1", grid_tolerance_mm=TOL)
    assert row["empty_prediction"] and row["dice"] == 0.0
    assert row["volume_diff_pct"] == pytest.approx(-100.0)
    summary = summarize([row, case_metrics(_image(ref), _image(ref), "c2", grid_tolerance_mm=TOL)])
    assert summary["n_empty_predictions"] == 1
    assert summary["hd95_n"] == 1 and summary["hd95_mean"] == 0.0
    assert summary["dice_mean"] == pytest.approx(0.5)


def test_volume_difference_in_ml_uses_spacing():
    ref = np.zeros((10, 10, 10), np.uint8)
    ref[:5] = 1  # 500 voxels
    pred = np.zeros_like(ref)
    pred[:4] = 1  # 400 voxels
    row = case_metrics(_image(pred, (2.0, 2.0, 2.0)), _image(ref, (2.0, 2.0, 2.0)), case_id="c", grid_tolerance_mm=TOL)
    assert row["ref_volume_ml"] == pytest.approx(500 * 8 / 1000)
    assert row["volume_diff_ml"] == pytest.approx(-100 * 8 / 1000)
    assert row["volume_diff_pct"] == pytest.approx(-20.0)


def test_grid_mismatch_names_case():
    a = _image(np.zeros((5, 5, 5), np.uint8))
    b = _image(np.zeros((5, 5, 6), np.uint8))
    with pytest.raises(MaskGridError, match="case 'x'"):
        case_metrics(a, b, case_id="x", grid_tolerance_mm=TOL)
    # the reference is the user's file: its spacing may differ by the tolerance, not more
    c = _image(np.zeros((5, 5, 5), np.uint8), (1.0, 1.0, 1.0 + TOL / 2))
    assert case_metrics(a, c, case_id="x", grid_tolerance_mm=TOL)["dice"] == 1.0
    with pytest.raises(MaskGridError, match="case 'x'.*spacing"):
        case_metrics(a, c, case_id="x", grid_tolerance_mm=TOL / 10)


def test_one_dice_and_volume_for_every_stage():
    """segmentation.metrics.dice is data.masks.dice, on arrays and SimpleITK images alike."""
    assert dice is masks.dice
    a = _sphere((16, 16, 16), (8, 8, 8), 4)
    b = _sphere((16, 16, 16), (8, 8, 10), 4)
    expected = 2 * int((a & b).sum()) / int(a.sum() + b.sum())
    assert dice(_image(a), _image(b)) == pytest.approx(expected) == dice(a, b)
    assert dice(np.zeros((3, 3, 3)), np.zeros((3, 3, 3))) == 1.0
    assert masks.volume_ml(500, (2.0, 2.0, 2.0)) == pytest.approx(4.0)  # 500 voxels of 8 mm^3
    assert masks.mask_volume_ml(_image(a, (0.5, 0.5, 2.0))) == pytest.approx(a.sum() * 0.5 / 1000)


def test_dice_by_group_gives_the_class_dependent_error_by_label_density_and_size():
    from bonemet.segmentation.metrics import dice_by_group

    # eight cases: lytic (low HU) lesions of label 0 segmented worse than blastic ones of label 1
    rows = [{"case_id": f"c{i}", "dice": d} for i, d in enumerate([0.5, 0.6, 0.7, 0.8, 0.82, 0.84, 0.9, 0.92])]
    labels = {f"c{i}": int(i >= 4) for i in range(8)}
    hu = {f"c{i}": 100.0 * i for i in range(8)}
    ml = {f"c{i}": [4, 3, 2, 1, 8, 7, 6, 5][i] for i in range(8)}
    bias = dice_by_group(rows, labels, hu, ml)
    assert bias["by_label"] == {"0": {"n": 4, "dice_mean": pytest.approx(0.65)},
                                "1": {"n": 4, "dice_mean": pytest.approx(0.87)}}
    assert bias["label_dice_gap"] == pytest.approx(0.22)
    density = bias["by_density_quartile"]
    assert [g["quartile"] for g in density] == [1, 2, 3, 4] and [g["n"] for g in density] == [2] * 4
    assert [g["dice_mean"] for g in density] == pytest.approx([0.55, 0.75, 0.83, 0.91])
    assert density[0]["hu_min"] == 0.0 and density[3]["hu_max"] == 700.0
    assert [g["dice_mean"] for g in bias["by_size_quartile"]] == pytest.approx([0.75, 0.55, 0.91, 0.83])
    # a case without a label or a lesion measurement is left out of that grouping only
    partial = dice_by_group(rows + [{"case_id": "x", "dice": 0.0}], labels, hu)
    assert partial["by_label"]["0"]["n"] == 4 and sum(g["n"] for g in partial["by_density_quartile"]) == 8
    assert "by_size_quartile" not in partial
    assert dice_by_group([], labels)["label_dice_gap"] is None
