"""Sliding-window inference, padding, largest component and mapping back to the original grid."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from bonemet.data.io import write_image
from bonemet.segmentation.data import SegCase
from bonemet.segmentation.inference import (
    CaseInferenceError,
    keep_largest_component,
    mirror_flips,
    predict_case,
    probability_to_original,
    sliding_window_logits,
)


class BrightIsLesion(torch.nn.Module):
    """A fixed 'network': lesion logit = 20 * (intensity - 0.5); checks shapes only for roi inputs."""

    def __init__(self, roi):
        super().__init__()
        self.roi = tuple(roi)

    def forward(self, x):
        assert tuple(x.shape[2:]) == self.roi, f"network fed {tuple(x.shape[2:])}, expected roi {self.roi}"
        fg = 20 * (x - 0.5)
        return torch.cat([-fg, fg], dim=1)


def test_volume_smaller_than_roi_is_padded():
    image = np.zeros((1, 5, 7, 9), np.float32)
    image[0, 2, 3, 4] = 1.0
    logits = sliding_window_logits(BrightIsLesion((8, 8, 8)), image, (8, 8, 8), overlap=0.25)
    assert tuple(logits.shape) == (1, 2, 5, 7, 9)
    pred = logits.argmax(1)[0].numpy()
    assert pred.sum() == 1 and pred[2, 3, 4] == 1


class ShiftRight(torch.nn.Module):
    """A fixed 'network' that is not mirror-symmetric: the lesion logit of a voxel is its left neighbour's intensity."""

    def forward(self, x):
        fg = torch.nn.functional.pad(x, (1, 0))[..., :-1]
        return torch.cat([-fg, fg], dim=1)


def test_mirror_flips_are_every_combination():
    assert mirror_flips(None) == [()]
    assert mirror_flips([2, 0]) == [(), (0,), (2,), (0, 2)]
    assert len(mirror_flips([0, 1, 2])) == 8
    for bad in ([3], [0, 0], [-1]):
        with pytest.raises(ValueError, match="mirror_axes"):
            mirror_flips(bad)


def test_mirroring_averages_flipped_back_predictions():
    image = np.zeros((1, 6, 6, 6), np.float32)
    image[0, 3, 3, 3] = 1.0
    net = ShiftRight()
    plain = sliding_window_logits(net, image, (6, 6, 6), overlap=0.0, mode="constant")[0, 1].numpy()
    assert plain[3, 3, 4] == pytest.approx(1.0) and plain[3, 3, 2] == 0.0
    # flipped along W, the shift goes the other way once flipped back: the average is symmetric
    mirrored = sliding_window_logits(net, image, (6, 6, 6), overlap=0.0, mode="constant", mirror_axes=[2])[0, 1]
    mirrored = mirrored.numpy()
    assert mirrored[3, 3, 4] == pytest.approx(0.5) and mirrored[3, 3, 2] == pytest.approx(0.5)
    # mirroring an axis the network treats symmetrically changes nothing
    same = sliding_window_logits(net, image, (6, 6, 6), overlap=0.0, mode="constant", mirror_axes=[0, 1])[0, 1]
    np.testing.assert_allclose(same.numpy(), plain, atol=1e-6)


def test_keep_largest_component():
    mask = np.zeros((10, 10, 10), np.uint8)
    mask[1:3, 1:3, 1:3] = 1
    mask[5:9, 5:9, 5:9] = 1
    out = keep_largest_component(mask)
    assert out.sum() == 64 and out[1, 1, 1] == 0
    assert keep_largest_component(np.zeros((3, 3, 3))).sum() == 0


def _original_and_crop():
    arr = np.zeros((12, 20, 20), np.float32)
    arr[4:8, 8:14, 6:12] = 1000.0
    original = sitk.GetImageFromArray(arr)
    original.SetSpacing((0.8, 0.8, 2.0))
    original.SetOrigin((10.0, -5.0, 3.0))
    crop = sitk.RegionOfInterest(original, (12, 12, 8), (4, 6, 2))  # keeps physical geometry
    crop = sitk.Cast(crop > 500, sitk.sitkFloat32)
    return original, crop


def test_probability_maps_back_onto_original_grid():
    original, crop = _original_and_crop()
    prob = sitk.GetArrayFromImage(crop)
    mask = probability_to_original(prob, crop, original)
    assert mask.GetSize() == original.GetSize() and mask.GetSpacing() == original.GetSpacing()
    expected = (sitk.GetArrayFromImage(original) > 500).astype(np.uint8)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), expected)


def test_predict_case_writes_original_grid(tmp_path):
    original, crop = _original_and_crop()
    write_image(original, tmp_path / "ct.nii.gz")
    write_image(crop, tmp_path / "pre.nii.gz")
    case = SegCase("c1", tmp_path / "pre.nii.gz", tmp_path / "pre.nii.gz", original_image=tmp_path / "ct.nii.gz")
    mask = predict_case(BrightIsLesion((8, 8, 8)), case, (8, 8, 8), overlap=0.5)
    assert mask.GetSize() == original.GetSize()
    assert sitk.GetArrayFromImage(mask).sum() == (sitk.GetArrayFromImage(original) > 500).sum()


def test_corrupt_image_names_case(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image")
    case = SegCase("case-007", bad, bad)
    with pytest.raises(CaseInferenceError, match="case-007"):
        predict_case(BrightIsLesion((8, 8, 8)), case, (8, 8, 8))
