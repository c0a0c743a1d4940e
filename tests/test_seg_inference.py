"""Sliding-window inference, padding, largest component and mapping back to the original grid."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from bonemet.data.io import ImageReadError, write_image
from bonemet.data.masks import dice
from bonemet.segmentation.data import SegCase
from bonemet.segmentation.inference import (
    CaseInferenceError,
    InferenceSettings,
    keep_largest_component,
    mirror_flips,
    predict_case,
    probability_to_original,
    segment_ct,
    sliding_window_logits,
)

#: sliding-window arguments of the direct calls (no mirroring unless a test asks for it)
WINDOWS = {"sw_batch_size": 4, "device": "cpu", "mirror_axes": (), "channels_last": False}


@pytest.fixture
def settings(params):
    """InferenceSettings from params.yaml (threshold 0.5, largest component) with 8^3 windows, overlap 0.5."""
    segment = params.segment.updated({"roi_size": [8, 8, 8], "inference.overlap": 0.5, "inference.mirror_axes": []})
    return InferenceSettings.from_params(params.preprocess, segment)


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
    logits = sliding_window_logits(BrightIsLesion((8, 8, 8)), image, (8, 8, 8), overlap=0.25, **WINDOWS)
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
    plain = sliding_window_logits(net, image, (6, 6, 6), overlap=0.0, mode="constant", **WINDOWS)[0, 1].numpy()
    assert plain[3, 3, 4] == pytest.approx(1.0) and plain[3, 3, 2] == 0.0
    # flipped along W, the shift goes the other way once flipped back: the average is symmetric
    windows = {**WINDOWS, "mirror_axes": [2]}
    mirrored = sliding_window_logits(net, image, (6, 6, 6), overlap=0.0, mode="constant", **windows)[0, 1]
    mirrored = mirrored.numpy()
    assert mirrored[3, 3, 4] == pytest.approx(0.5) and mirrored[3, 3, 2] == pytest.approx(0.5)
    # mirroring an axis the network treats symmetrically changes nothing
    windows = {**WINDOWS, "mirror_axes": [0, 1]}
    same = sliding_window_logits(net, image, (6, 6, 6), overlap=0.0, mode="constant", **windows)[0, 1]
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
    mask = probability_to_original(prob, crop, original, threshold=0.5, largest_component=True)
    assert mask.GetSize() == original.GetSize() and mask.GetSpacing() == original.GetSpacing()
    expected = (sitk.GetArrayFromImage(original) > 500).astype(np.uint8)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), expected)


def test_probability_threshold_and_largest_component_are_the_callers():
    original, crop = _original_and_crop()
    prob = sitk.GetArrayFromImage(crop) * 0.6  # lesion probability 0.6
    prob[0, 0, 0] = 0.9  # a stray voxel, far from the lesion
    kept = sitk.GetArrayFromImage(probability_to_original(prob, crop, original, threshold=0.5,
                                                          largest_component=False))
    largest = sitk.GetArrayFromImage(probability_to_original(prob, crop, original, threshold=0.5,
                                                             largest_component=True))
    strict = sitk.GetArrayFromImage(probability_to_original(prob, crop, original, threshold=0.7,
                                                            largest_component=False))
    lesion = (sitk.GetArrayFromImage(original) > 500).astype(np.uint8)
    np.testing.assert_array_equal(largest, lesion)
    assert kept.sum() > lesion.sum() and (kept & lesion).sum() == lesion.sum()
    assert 0 < strict.sum() < lesion.sum() and not (strict & lesion).any()


def test_predict_case_writes_original_grid(tmp_path, settings):
    original, crop = _original_and_crop()
    write_image(original, tmp_path / "ct.nii.gz")
    write_image(crop, tmp_path / "pre.nii.gz")
    case = SegCase("c1", tmp_path / "pre.nii.gz", tmp_path / "pre.nii.gz", original_image=tmp_path / "ct.nii.gz")
    mask = predict_case(BrightIsLesion(settings.roi_size), case, settings, device="cpu")
    assert mask.GetSize() == original.GetSize()
    assert sitk.GetArrayFromImage(mask).sum() == (sitk.GetArrayFromImage(original) > 500).sum()


def test_corrupt_image_names_case(tmp_path, settings):
    """A user's unreadable file keeps the reader's error (a UserError naming the case), noted by inference."""
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image")
    case = SegCase("case-007", bad, bad)
    with pytest.raises(ImageReadError, match="case 'case-007'") as info:
        predict_case(BrightIsLesion(settings.roi_size), case, settings, device="cpu")
    assert any("while segmenting case 'case-007'" in note for note in info.value.__notes__)


class Broken(torch.nn.Module):
    def forward(self, x):
        raise RuntimeError("planted bug")


def test_a_bug_during_inference_keeps_its_type_and_names_the_case(tmp_path, settings):
    original, crop = _original_and_crop()
    write_image(crop, tmp_path / "pre.nii.gz")
    case = SegCase("case-008", tmp_path / "pre.nii.gz", tmp_path / "pre.nii.gz")
    with pytest.raises(RuntimeError, match="planted bug") as info:
        predict_case(Broken(), case, settings, device="cpu")
    assert not isinstance(info.value, CaseInferenceError)
    assert any("case 'case-008'" in note for note in info.value.__notes__)
    with pytest.raises(RuntimeError, match="planted bug") as info:
        segment_ct(Broken(), original, settings, device="cpu", case_id="new-ct")
    assert any("case 'new-ct'" in note for note in info.value.__notes__)


def test_segment_ct_preprocesses_with_the_settings_and_maps_back(params):
    """A new CT (HU) end to end: bone crop, 1.5 mm grid, windows, threshold, back on the CT's grid."""
    z, y, x = np.indices((20, 40, 40)).astype(float)
    hu = np.full((20, 40, 40), 40.0)
    hu[5:15, 10:30, 10:30] = 700.0  # bone (>= crop.bone_threshold_hu)
    lesion = ((z - 10) * 2.0) ** 2 + ((y - 20) * 0.8) ** 2 + ((x - 20) * 0.8) ** 2 <= 5.0**2
    hu[lesion] = 1500.0  # bright: BrightIsLesion's lesion (> 800 HU in the [-200, 1800] window)
    image = sitk.GetImageFromArray(hu.astype(np.int16))
    image.SetSpacing((0.8, 0.8, 2.0))
    image.SetOrigin((-16.0, 4.0, 30.0))
    segment = params.segment.updated({"roi_size": [16, 16, 16], "inference.mirror_axes": [0, 2]})
    settings = InferenceSettings.from_params(params.preprocess, segment)
    mask = segment_ct(BrightIsLesion((16, 16, 16)), image, settings, device="cpu", case_id="new")
    assert mask.GetSize() == image.GetSize() and mask.GetOrigin() == image.GetOrigin()
    assert dice(mask, lesion.astype(np.uint8)) > 0.85
    # the CT is windowed as the settings say: in [-200, 3800] HU the lesion scales to 0.425, below
    # BrightIsLesion's 0.5, so nothing is lesion
    wide = InferenceSettings.from_params(params.preprocess.updated({"hu_window": [-200, 3800]}), segment)
    assert sitk.GetArrayFromImage(segment_ct(BrightIsLesion((16, 16, 16)), image, wide, device="cpu",
                                             case_id="new")).sum() == 0


def test_inference_settings_round_trip_through_model_metadata(params):
    settings = InferenceSettings.from_params(params.preprocess, params.segment)
    assert settings.roi_size == tuple(params.segment.roi_size) and settings.threshold == params.segment.threshold
    assert settings.inference == params.segment.inference
    assert settings.preprocess.model_dump() == params.preprocess.model_dump()  # as the planned type
    metadata = settings.to_metadata()
    import json

    assert InferenceSettings.from_metadata(json.loads(json.dumps(metadata)), "model m") == settings


def test_inference_settings_from_incomplete_metadata_name_the_model(params):
    """A model logged without its inference settings (an older bonemet) is refused: no params fallback."""
    metadata = InferenceSettings.from_params(params.preprocess, params.segment).to_metadata()
    where = "models:/bonemet-segmenter@staging"
    partial = {k: v for k, v in metadata.items() if k not in ("preprocess", "threshold")}
    with pytest.raises(CaseInferenceError, match=r"models:/bonemet-segmenter@staging: its metadata lacks preprocess, threshold"):
        InferenceSettings.from_metadata(partial, where)
    bad = {**metadata, "inference": {**metadata["inference"], "overlap": 1.5}}
    with pytest.raises(CaseInferenceError, match=r"models:/bonemet-segmenter@staging: its inference settings are invalid.*overlap"):
        InferenceSettings.from_metadata(bad, where)
    extra = {**metadata, "preprocess": {**metadata["preprocess"], "spacing": [1, 1, 1]}}
    with pytest.raises(CaseInferenceError, match=r"preprocess.spacing: unknown key"):
        InferenceSettings.from_metadata(extra, where)


# --- the sliding window itself: MONAI's result without MONAI, limited windows, memory format ---------


class SmallConvNet(torch.nn.Module):
    """A seeded two-layer 3D CNN: logits that depend on each voxel's neighbourhood (not symmetric)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.a = torch.nn.Conv3d(1, 4, 3, padding=1)
        self.b = torch.nn.Conv3d(4, 2, 3, padding=1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize(("shape", "roi", "overlap", "mode"), [
    ((20, 17, 9), (8, 8, 8), 0.5, "gaussian"),  # last window moved back to the edge; W padded
    ((5, 30, 33), (8, 16, 8), 0.25, "constant"),  # D smaller than the window: padded on both sides
    ((16, 16, 16), (16, 16, 16), 0.5, "gaussian"),  # one window
    ((13, 21, 40), (8, 8, 8), 0.0, "gaussian"),
])
def test_sliding_window_equals_monai(shape, roi, overlap, mode):
    from monai.inferers import sliding_window_inference

    net = SmallConvNet().eval()
    image = np.random.default_rng(1).random((1, *shape)).astype(np.float32)
    ours = sliding_window_logits(net, image, roi, overlap=overlap, mode=mode, **{**WINDOWS, "sw_batch_size": 3})
    with torch.no_grad():
        reference = sliding_window_inference(torch.as_tensor(image)[None], roi, 3, net, overlap=overlap, mode=mode,
                                             padding_mode="constant", cval=0.0)
    assert ours.shape == reference.shape == (1, 2, *shape)
    np.testing.assert_allclose(ours.numpy(), reference.numpy(), rtol=1e-5, atol=1e-5)


def test_importance_map_and_window_positions_are_monais():
    from monai.data.utils import compute_importance_map, dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    from bonemet.segmentation.inference import importance_map, window_starts

    for roi in ((8, 8, 8), (16, 12, 32), (5, 7, 9)):
        np.testing.assert_allclose(importance_map(roi, "gaussian"),
                                   compute_importance_map(roi, mode="gaussian", sigma_scale=0.125).numpy(), rtol=1e-6)
    for size, roi, overlap in (((40, 33, 17), (16, 16, 16), 0.5), ((64, 64, 200), (32, 32, 32), 0.25)):
        interval = _get_scan_interval(size, roi, 3, (overlap,) * 3)
        expected = sorted(tuple(s.start for s in sl) for sl in dense_patch_slices(size, roi, interval))
        assert sorted(map(tuple, window_starts(size, roi, overlap).tolist())) == expected


def test_windows_far_from_bone_are_skipped_and_near_ones_are_exact():
    """Limited to windows within the margin of ``keep``: the logits equal the dense ones wherever
    ``keep`` lies within the margin; voxels no window covers are background; fewer windows run."""
    from bonemet.segmentation.inference import SKIPPED_BACKGROUND_LOGIT, window_starts, windows_near

    net = SmallConvNet().eval()
    image = np.random.default_rng(2).random((1, 48, 48, 48)).astype(np.float32)
    keep = np.zeros((48, 48, 48), bool)
    keep[4:8, 4:8, 4:8] = True  # "bone" in one corner only
    margin = (3, 3, 3)
    calls = []

    class Counting(torch.nn.Module):
        def forward(self, x):
            calls.append(x.shape[0])
            return net(x)

    dense = sliding_window_logits(net, image, (16, 16, 16), overlap=0.5, **WINDOWS)
    limited = sliding_window_logits(Counting(), image, (16, 16, 16), overlap=0.5, keep=keep, keep_margin_vox=margin,
                                    **WINDOWS)
    starts = window_starts((48, 48, 48), (16, 16, 16), 0.5)
    near = windows_near(keep, starts, (16, 16, 16), margin)
    assert sum(calls) == int(near.sum()) < len(starts)
    # exact where keep (dilated by the margin) is
    grown = np.zeros_like(keep)
    grown[1:11, 1:11, 1:11] = True
    np.testing.assert_allclose(limited[0][:, grown].numpy(), dense[0][:, grown].numpy(), rtol=1e-6, atol=1e-6)
    # the far corner is covered by no window: background
    far = limited[0, :, 40:, 40:, 40:]
    assert torch.all(far[0] == SKIPPED_BACKGROUND_LOGIT) and torch.all(far[1] == 0)
    assert int(torch.softmax(limited, 1)[0, 1, 40:, 40:, 40:].gt(1e-9).sum()) == 0
    # windows_near is "the window's box grown by the margin holds a keep voxel", by brute force
    for (z, y, x), flag in zip(starts, near, strict=True):
        box = keep[max(z - 3, 0):z + 19, max(y - 3, 0):y + 19, max(x - 3, 0):x + 19]
        assert bool(box.any()) == bool(flag)
    # nothing to keep: no window at all, background everywhere
    none = sliding_window_logits(net, image, (16, 16, 16), overlap=0.5, keep=np.zeros_like(keep), **WINDOWS)
    assert torch.all(none.argmax(1) == 0)


def test_channels_last_gives_the_same_logits():
    net = SmallConvNet().eval()
    image = np.random.default_rng(3).random((1, 20, 24, 18)).astype(np.float32)
    plain = sliding_window_logits(net, image, (8, 8, 8), overlap=0.5, **WINDOWS)
    fast = sliding_window_logits(net, image, (8, 8, 8), overlap=0.5, **{**WINDOWS, "channels_last": True})
    np.testing.assert_allclose(fast.numpy(), plain.numpy(), rtol=1e-4, atol=1e-5)


def test_mirroring_is_per_window_and_batched():
    """Each window runs once per flip (2**n passes), in batches of sw_batch_size windows."""
    net = SmallConvNet().eval()
    seen = []

    class Recording(torch.nn.Module):
        def forward(self, x):
            seen.append(x.shape[0])
            return net(x)

    image = np.random.default_rng(4).random((1, 16, 16, 24)).astype(np.float32)
    out = sliding_window_logits(Recording(), image, (16, 16, 16), overlap=0.5,
                                **{**WINDOWS, "sw_batch_size": 4, "mirror_axes": [0, 2]})
    n_windows = 2  # 24 along W: starts 0 and 8
    assert sum(seen) == n_windows * 4 and max(seen) == 4
    # the average of the four flips of each window, as done by hand
    manual = torch.zeros_like(out)
    for flips in ((), (2,), (4,), (2, 4)):
        x = torch.as_tensor(image)[None]
        xf = torch.flip(x, flips) if flips else x
        with torch.no_grad():
            lf = sliding_window_logits(net, xf[0].numpy(), (16, 16, 16), overlap=0.5, **WINDOWS)
        manual += torch.flip(lf, flips) if flips else lf
    # the flipped volume's window positions mirror the original's here (24 - 16 is a multiple of the step)
    np.testing.assert_allclose(out.numpy(), (manual / 4).numpy(), rtol=1e-5, atol=1e-5)


def test_probability_mapped_on_the_crop_region_equals_the_whole_grid():
    """Resampling only the part of the CT the crop covers gives the mask of resampling the whole CT
    (oblique, anisotropic grids; a crop touching the CT's edge)."""
    from bonemet.data.io import resample_to_reference

    rng = np.random.default_rng(5)
    original = sitk.GetImageFromArray(np.zeros((30, 40, 36), np.int16))
    original.SetSpacing((0.7, 0.9, 2.5))
    original.SetOrigin((-12.0, 4.0, 100.0))
    original.SetDirection(sitk.VersorTransform((0.2, 0.1, 1.0), 0.4).GetMatrix())
    for start in ((0, 0, 0), (6, 4, 9)):
        crop = sitk.Image([14, 12, 10], sitk.sitkFloat32)
        crop.SetSpacing((1.5, 1.5, 1.5))
        crop.SetDirection(original.GetDirection())
        crop.SetOrigin(original.TransformContinuousIndexToPhysicalPoint([float(v) for v in start]))
        prob = rng.random((10, 12, 14)).astype(np.float32)
        mask = probability_to_original(prob, crop, original, threshold=0.6, largest_component=False)
        whole = sitk.GetImageFromArray(prob)
        whole.CopyInformation(crop)
        expected = sitk.GetArrayFromImage(resample_to_reference(whole, original, sitk.sitkLinear, 0.0)) >= 0.6
        assert mask.GetSize() == original.GetSize()
        np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), expected.astype(np.uint8))
        assert expected.any()


def test_inference_settings_window_tta_and_bone(params):
    segment = params.segment.updated({"roi_size": [16, 16, 16], "inference.roi_size": [32, 32, 48],
                                      "inference.mirror_axes": [0, 1], "inference.bone_margin_mm": 4.0})
    settings = InferenceSettings.from_params(params.preprocess, segment)
    assert settings.window == (32, 32, 48) and settings.roi_size == (16, 16, 16)
    assert settings.without_mirroring().inference.mirror_axes == () and settings.inference.mirror_axes == (0, 1)
    spacing = params.preprocess.target_spacing_mm
    assert settings.margin_vox() == tuple(int(np.ceil(4.0 / s)) for s in reversed(spacing))
    lo, hi = params.preprocess.hu_window
    at = (params.preprocess.crop.bone_threshold_hu - lo) / (hi - lo)
    crop = np.array([[[at - 0.01, at + 0.01]]], np.float32)
    np.testing.assert_array_equal(settings.bone_in_crop(crop), [[[False, True]]])
    dense = InferenceSettings.from_params(params.preprocess, params.segment.updated({"inference.bone_margin_mm": None}))
    assert dense.bone_in_crop(crop) is None and dense.margin_vox() == (0, 0, 0)
    assert dense.window == tuple(params.segment.roi_size)


def test_metadata_of_older_models_means_dense_windows_of_the_training_size(params):
    """A model registered before inference.roi_size / bone_margin_mm / channels_last existed
    segments as it did then."""
    metadata = InferenceSettings.from_params(params.preprocess, params.segment).to_metadata()
    for key in ("roi_size", "bone_margin_mm", "channels_last"):
        metadata["inference"].pop(key)
    old = InferenceSettings.from_metadata(metadata, "model m")
    assert old.inference.roi_size is None and old.inference.bone_margin_mm is None
    assert old.inference.channels_last is False and old.window == tuple(params.segment.roi_size)


def test_bone_margin_needs_the_bone_threshold_inside_the_window(params_file):
    from bonemet.config import ParamsError, load_specs

    path = params_file({"preprocess": {"hu_window": [300, 1800]}})
    with pytest.raises(ParamsError, match=r"bone_margin_mm is set, so preprocess.crop.bone_threshold_hu .* inside"):
        load_specs(path)
    assert load_specs(params_file({"preprocess": {"hu_window": [300, 1800]},
                                   "segment": {"inference": {"bone_margin_mm": None}}})) is not None


def test_clinical_size_ct_from_a_synthetic_case(tmp_path):
    """512 x 512-like matrix at the asked spacing, air outside a body, the spine repeated along z, bone
    spread over the body (ribs, pelvis), the case's lesion once in the mask, inside bone."""
    from bonemet.data.io import read_mask
    from bonemet.data.manifest import read_manifest
    from bonemet.data.synthetic import generate_cohort
    from bonemet.data.synthetic_clinical import clinical_ct
    from bonemet.preprocessing.crop import bone_crop_box

    generate_cohort(tmp_path, n_cases=2, n_positive=1, seed=1, size="small", mask_label=1, show_progress=False)
    case = read_manifest(tmp_path)[0]
    source = sitk.ReadImage(str(case.image))
    source_mask = read_mask(case.manual_mask, label=1)
    image, mask = clinical_ct(source, source_mask, size=(160, 160, 60), spacing_mm=(2.5, 2.5, 3.0), seed=0)
    assert image.GetSize() == mask.GetSize() == (160, 160, 60) and image.GetSpacing() == (2.5, 2.5, 3.0)
    hu = sitk.GetArrayFromImage(image)
    assert hu.dtype == np.int16 and hu[0, 0, 0] == -1000 and hu[:, 80, 80].max() > -200  # air outside, body inside
    lesion_ml = np.count_nonzero(sitk.GetArrayViewFromImage(mask)) * 2.5 * 2.5 * 3.0 / 1000
    assert lesion_ml == pytest.approx(np.count_nonzero(sitk.GetArrayViewFromImage(source_mask))
                                      * np.prod(source.GetSpacing()) / 1000, rel=0.5)
    box = bone_crop_box(image, 200, 0.0, (1, 1, 1), 1.0)
    assert box.size[0] > 0.5 * 160 and box.size[2] > 0.9 * 60  # ribs and pelvis spread the bone
    with pytest.raises(ValueError, match="does not fit"):
        clinical_ct(source, source_mask, size=(8, 8, 8), spacing_mm=(0.5, 0.5, 1.0), seed=0)
