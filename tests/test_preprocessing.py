"""Preprocessing: resampling, normalisation, bone crop, round trip, cohort writer."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from bonemet.config import ParamsError
from bonemet.data.io import ImageReadError
from bonemet.data.masks import dice
from bonemet.preprocessing import (
    PreprocessError,
    bone_crop_box,
    crop_to_box,
    map_mask_to_original,
    normalise_intensity,
    preprocess_case,
    preprocess_cohort,
    preprocess_image,
    read_preprocessed,
    resample_image,
    resample_mask,
    resample_mask_to_spacing,
    resampled_grid,
)
from compute_specs import LOCAL_COMPUTE

SPACING = (0.8, 0.8, 2.0)
ORIGIN = (-12.0, 30.0, 101.5)
#: over the repository's preprocess params (1.5 mm, bspline, [-200, 1800] HU, bone > 200 HU): a
#: small margin, box and component size for the small phantoms
SMALL = {"crop.margin_mm": 3.0, "crop.min_size_vox": [8, 8, 8], "crop.min_component_ml": 0.01, "n_jobs": 1}


@pytest.fixture(scope="module")
def spec(params):
    """The preprocess spec of these tests (params.yaml with :data:`SMALL`)."""
    return params.preprocess.updated(SMALL)


@pytest.fixture(scope="module")
def tol(params) -> float:
    """How far a mask's grid may differ from its CT's (params validate.grid_tolerance_mm)."""
    return params.validation.grid_tolerance_mm


def _phantom(
    size=(40, 40, 20), spacing=SPACING, bone_lo=(10, 12, 5), bone_hi=(26, 30, 15), radius_mm=4.0, seed=0
) -> tuple[sitk.Image, sitk.Image]:
    """int16 CT (soft tissue ~40 HU with noise, a bright bone block) and a sphere lesion inside the bone."""
    rng = np.random.default_rng(seed)
    arr = rng.normal(40, 15, size[::-1]).astype(np.int16)  # numpy (z, y, x)
    (x0, y0, z0), (x1, y1, z1) = bone_lo, bone_hi
    arr[z0:z1, y0:y1, x0:x1] = 700
    z, y, x = np.indices(size[::-1]).astype(float)
    centre = [(a + b - 1) / 2 for a, b in zip(bone_lo, bone_hi, strict=True)]
    dist2 = sum(((g - c) * s) ** 2 for g, c, s in zip((x, y, z), centre, spacing, strict=True))
    lesion = (dist2 <= radius_mm**2).astype(np.uint8)
    arr[lesion > 0] = 1100
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing(spacing)
    image.SetOrigin(ORIGIN)
    mask = sitk.GetImageFromArray(lesion)
    mask.CopyInformation(image)
    return image, mask


def _extent(image: sitk.Image) -> np.ndarray:
    return np.asarray(image.GetSize()) * np.asarray(image.GetSpacing())


def _physical_box(image: sitk.Image, arr_bool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = np.argwhere(arr_bool)[:, ::-1]  # (x, y, z)
    pts = np.array(
        [image.TransformIndexToPhysicalPoint([int(v) for v in i]) for i in (idx.min(0), idx.max(0))]
    )
    return pts.min(0), pts.max(0)


@pytest.mark.parametrize("interpolator", ["bspline", "linear"])
def test_resample_image_keeps_extent_origin_direction(interpolator):
    image, _ = _phantom()
    out = resample_image(image, (1.5, 1.5, 1.5), interpolator)
    assert out.GetSpacing() == pytest.approx((1.5, 1.5, 1.5))
    assert out.GetOrigin() == pytest.approx(image.GetOrigin())
    assert out.GetDirection() == pytest.approx(image.GetDirection())
    assert out.GetPixelID() == sitk.sitkFloat32
    assert out.GetSize() == tuple(int(round(e / 1.5)) for e in _extent(image))
    assert np.all(np.abs(_extent(out) - _extent(image)) <= 1.5 / 2 + 1e-6)


def test_resample_rejects_bad_arguments():
    image, _ = _phantom()
    with pytest.raises(ValueError, match="spacing"):
        resample_image(image, (1.0, 0.0, 1.0), "bspline")
    with pytest.raises(ValueError, match="interpolator"):
        resample_image(image, (1.0, 1.0, 1.0), "cubic")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"image_interpolator": "cubic"}, r"image_interpolator: .*'bspline' or 'linear'.*found 'cubic'"),
        ({"mask_interpolator": "bspline"}, r"mask_interpolator: .*found 'bspline'"),
        ({"hu_window": [500, 100]}, r"hu_window: must be \[low, high\] HU with low < high; found \[500.0, 100.0\]"),
        ({"n_jobs": 0}, r"n_jobs: must be a positive number of processes or -1"),
        ({"target_spacing_mm": [1.0, 0.0, 1.0]}, r"target_spacing_mm\[1\]: .*greater than 0"),
        ({"crop.min_size_vox": [32, 32]}, r"crop.min_size_vox"),
        ({"crop.margin": 3.0}, r"crop.margin: unknown key"),
    ],
)
def test_preprocess_spec_refuses_bad_settings_naming_the_key(spec, changes, message):
    with pytest.raises(ParamsError, match=message):
        spec.updated(changes)


@pytest.mark.parametrize("interpolator", ["nearest", "linear"])
def test_resampled_mask_stays_binary_and_keeps_volume(interpolator):
    _, mask = _phantom(radius_mm=5.0)
    out = resample_mask_to_spacing(mask, (1.1, 1.1, 1.1), interpolator)
    arr = sitk.GetArrayViewFromImage(out)
    assert out.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(arr)) <= {0, 1}
    vol_in = sitk.GetArrayViewFromImage(mask).sum() * np.prod(mask.GetSpacing())
    vol_out = arr.sum() * np.prod(out.GetSpacing())
    assert vol_out == pytest.approx(vol_in, rel=0.25)


def test_normalise_intensity_range_and_scale():
    image, _ = _phantom()
    arr_in = sitk.GetArrayFromImage(image).astype(float)
    arr_in[0, 0, :3] = [-1024, 3000, 800]
    src = sitk.GetImageFromArray(arr_in.astype(np.int16))
    out = normalise_intensity(src, (-200, 1800))
    arr = sitk.GetArrayViewFromImage(out)
    assert out.GetPixelID() == sitk.sitkFloat32
    assert arr.min() >= 0.0 and arr.max() <= 1.0
    assert arr[0, 0, 0] == 0.0 and arr[0, 0, 1] == 1.0
    assert arr[0, 0, 2] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="hu_window"):
        normalise_intensity(src, (500, 100))


def test_bone_crop_contains_bone_and_lesion_and_ignores_specks():
    image, mask = _phantom(size=(60, 60, 24))
    arr = sitk.GetArrayFromImage(image)
    arr[2, 2, 2] = 1500  # a bright speck far from the bone: noise, not spine
    image2 = sitk.GetImageFromArray(arr)
    image2.CopyInformation(image)
    resampled = resample_image(image2, (1.5, 1.5, 1.5), "bspline")
    box = bone_crop_box(resampled, 200.0, margin_mm=3.0, min_size_vox=(4, 4, 4), min_component_ml=0.05)
    crop = crop_to_box(resampled, box, pad_value=-200)
    lo_c, hi_c = _physical_box(crop, np.ones(crop.GetSize()[::-1], bool))
    for arr_bool in (sitk.GetArrayViewFromImage(image) > 200, sitk.GetArrayViewFromImage(mask) > 0):
        lo, hi = _physical_box(image, arr_bool)
        assert np.all(lo >= lo_c - 1.5) and np.all(hi <= hi_c + 1.5)
    speck = np.asarray(image.TransformIndexToPhysicalPoint((2, 2, 2)))
    assert np.any(speck < lo_c - 3.0)  # the speck did not stretch the box
    assert all(0 <= s for s in box.start) and all(
        e <= n for e, n in zip(box.stop, resampled.GetSize(), strict=True)
    )


def test_crop_uses_the_image_only(spec, tol):
    image, mask = _phantom()
    empty = sitk.Image(mask)
    empty *= 0
    a = preprocess_case(image, mask, spec, grid_tolerance_mm=tol)
    b = preprocess_case(image, empty, spec, grid_tolerance_mm=tol)
    c = preprocess_image(image, spec)
    assert a.geometry["crop_start_index"] == b.geometry["crop_start_index"] == c.geometry["crop_start_index"]
    assert a.geometry["crop_size"] == c.geometry["crop_size"]
    assert c.mask is None


def test_small_volume_is_padded_to_minimum_size(spec, tol):
    image, mask = _phantom(size=(20, 20, 8), bone_lo=(5, 5, 2), bone_hi=(15, 15, 6), radius_mm=2.0)
    result = preprocess_case(image, mask, spec.updated({"crop.min_size_vox": [32, 32, 32]}), grid_tolerance_mm=tol)
    assert result.image.GetSize() == (32, 32, 32)
    assert result.mask.GetSize() == (32, 32, 32)
    assert result.geometry["padded"] is True
    assert any(s < 0 for s in result.geometry["crop_start_index"])
    arr = sitk.GetArrayViewFromImage(result.image)
    assert arr[0, 0, 0] == 0.0  # padding is the window minimum, 0 after scaling
    assert sitk.GetArrayViewFromImage(result.mask).sum() > 0
    # The padded output still sits in the original physical space: the lesion maps back.
    back = map_mask_to_original(result.mask, image, "nearest")
    assert dice(back, mask) > 0.5


def test_preprocess_case_outputs_and_geometry(spec, tol):
    image, mask = _phantom()
    result = preprocess_case(image, mask, spec, grid_tolerance_mm=tol, case_id="c1")
    arr = sitk.GetArrayViewFromImage(result.image)
    assert result.image.GetPixelID() == sitk.sitkFloat32
    assert 0.0 <= arr.min() and arr.max() <= 1.0
    assert result.mask.GetPixelID() == sitk.sitkUInt8
    ok = (
        result.image.GetSize() == result.mask.GetSize()
        and result.image.GetOrigin() == result.mask.GetOrigin()
    )
    assert ok
    geo = result.geometry
    assert geo["original_size"] == list(image.GetSize())
    assert geo["original_spacing_mm"] == pytest.approx(list(image.GetSpacing()))
    assert geo["original_origin_mm"] == pytest.approx(list(image.GetOrigin()))
    assert geo["resampled_spacing_mm"] == pytest.approx([1.5, 1.5, 1.5])
    assert geo["crop_size"] == list(result.image.GetSize())
    assert geo["mask_voxels_outside_crop"] == 0
    # The crop's origin is the physical point of the crop start in the resampled grid.
    grid = resampled_grid(image, (1.5, 1.5, 1.5))
    expected = grid.TransformContinuousIndexToPhysicalPoint([float(v) for v in geo["crop_start_index"]])
    assert result.image.GetOrigin() == pytest.approx(expected)


def test_mask_on_another_grid_is_refused_naming_the_case(spec, tol):
    image, mask = _phantom()
    shifted = sitk.Image(mask)
    # within the tolerance (validate.grid_tolerance_mm) the mask is on the image's grid ...
    shifted.SetOrigin(tuple(o + tol / 2 for o in ORIGIN))
    assert preprocess_case(image, shifted, spec, grid_tolerance_mm=tol).mask is not None
    # ... beyond it, it is not
    shifted.SetOrigin(tuple(o + 2 * tol for o in ORIGIN))
    with pytest.raises(PreprocessError, match="case 'bad'.*grid.*origin"):
        preprocess_case(image, shifted, spec, grid_tolerance_mm=tol, case_id="bad")
    mask.SetOrigin((0.0, 0.0, 0.0))
    with pytest.raises(PreprocessError, match="case 'bad'.*grid"):
        preprocess_case(image, mask, spec, grid_tolerance_mm=tol, case_id="bad")


@pytest.mark.parametrize("spacing,radius_mm", [((0.7, 0.7, 2.5), 8.0), ((0.9, 0.9, 1.0), 10.0)])
def test_round_trip_dice(spec, tol, spacing, radius_mm):
    size = (110, 110, int(round(60 / spacing[2])))
    bone_lo = tuple(int(round((n * s / 2 - 20) / s)) for n, s in zip(size, spacing, strict=True))
    bone_hi = tuple(int(round((n * s / 2 + 20) / s)) for n, s in zip(size, spacing, strict=True))
    image, mask = _phantom(size=size, spacing=spacing, bone_lo=bone_lo, bone_hi=bone_hi, radius_mm=radius_mm)
    options = spec.updated({"target_spacing_mm": [1.0, 1.0, 1.0], "crop.margin_mm": 10.0,
                            "crop.min_size_vox": [64, 64, 64]})
    result = preprocess_case(image, mask, options, grid_tolerance_mm=tol)
    back = map_mask_to_original(result.mask, image, "nearest")
    assert back.GetPixelID() == sitk.sitkUInt8
    assert back.GetSize() == image.GetSize() and back.GetOrigin() == pytest.approx(image.GetOrigin())
    assert dice(back, mask) > 0.95


def test_resample_mask_onto_reference_grid():
    image, mask = _phantom()
    ref = resampled_grid(image, (2.0, 2.0, 2.0))
    out = resample_mask(mask, ref, "nearest")
    assert out.GetSize() == ref.GetSize() and out.GetSpacing() == ref.GetSpacing()


# --- cohort -------------------------------------------------------------------------------------


def _write_cohort(root: Path, n: int = 3) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for i in range(n):
        image, mask = _phantom(seed=i, radius_mm=3.0 + i)
        labelmap = sitk.Cast(mask, sitk.sitkUInt8) * 1
        sitk.WriteImage(image, str(root / "images" / f"case{i}.nii.gz"))
        sitk.WriteImage(labelmap, str(root / "masks" / f"case{i}.nii.gz"))
        rows.append(
            {
                "case_id": f"case{i}",
                "label": i % 2,
                "image": f"images/case{i}.nii.gz",
                "mask": f"masks/case{i}.nii.gz",
            }
        )
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_preprocess_cohort_writes_every_case(tmp_path, spec, tol, n_jobs):
    cohort = _write_cohort(tmp_path / "raw")
    before = _tree_digest(cohort)
    out = tmp_path / "pre"
    table = preprocess_cohort(cohort, spec.updated({"out_dir": str(out), "n_jobs": n_jobs}), compute=LOCAL_COMPUTE, mask_label=1, roi=None, seg_segment=None, pseudonym_key=None,
                              grid_tolerance_mm=tol, show_progress=False)
    assert list(table.columns) == ["case_id", "label", "image", "mask", "geometry"]
    assert list(table["case_id"]) == ["case0", "case1", "case2"]
    assert _tree_digest(cohort) == before  # input folder byte-identical
    on_disk = pd.read_csv(out / "cases.csv", dtype={"case_id": str})
    assert list(on_disk["case_id"]) == ["case0", "case1", "case2"]
    for row in read_preprocessed(out).itertuples():
        image = sitk.ReadImage(row.image)
        mask = sitk.ReadImage(row.mask)
        assert image.GetPixelID() == sitk.sitkFloat32 and mask.GetPixelID() == sitk.sitkUInt8
        assert Path(row.geometry).is_file()
        assert sitk.GetArrayViewFromImage(mask).sum() > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pre")]  # no temporary folder left


def test_preprocess_cohort_failure_names_case_and_keeps_previous_output(tmp_path, spec, tol):
    cohort = _write_cohort(tmp_path / "raw")
    out = tmp_path / "pre"
    options = spec.updated({"out_dir": str(out), "n_jobs": 1})
    preprocess_cohort(cohort, options, compute=LOCAL_COMPUTE, mask_label=1, roi=None, seg_segment=None, pseudonym_key=None, grid_tolerance_mm=tol, show_progress=False)
    previous = _tree_digest(out)
    (cohort / "images" / "case1.nii.gz").write_bytes(b"not an image")
    before = _tree_digest(cohort)
    # a user's unreadable file: the reader's error (a ValueError), naming the case
    with pytest.raises(ImageReadError, match="case 'case1'") as info:
        preprocess_cohort(cohort, options, compute=LOCAL_COMPUTE, mask_label=1, roi=None, seg_segment=None, pseudonym_key=None, grid_tolerance_mm=tol, show_progress=False)
    assert isinstance(info.value, ValueError)
    assert any("while preprocessing case 'case1'" in note for note in info.value.__notes__)
    assert _tree_digest(out) == previous
    assert _tree_digest(cohort) == before


def test_preprocess_cohort_bug_keeps_its_type_with_a_note_naming_the_case(tmp_path, spec, tol, monkeypatch):
    """A failure that is not the user's (here a planted bug) is not re-wrapped as bad input."""
    from bonemet.preprocessing import pipeline

    cohort = _write_cohort(tmp_path / "raw")
    out = tmp_path / "pre"

    def broken(image, mask, spec, *, grid_tolerance_mm, case_id=None):
        if case_id == "case2":
            raise KeyError("planted")
        return real(image, mask, spec, grid_tolerance_mm=grid_tolerance_mm, case_id=case_id)

    real = pipeline.preprocess_case
    monkeypatch.setattr(pipeline, "preprocess_case", broken)
    with pytest.raises(KeyError, match="planted") as info:
        preprocess_cohort(cohort, spec.updated({"out_dir": str(out), "n_jobs": 1}), compute=LOCAL_COMPUTE, mask_label=1, roi=None, seg_segment=None, pseudonym_key=None,
                          grid_tolerance_mm=tol, show_progress=False)
    assert not isinstance(info.value, PreprocessError)
    assert any("case 'case2'" in note for note in info.value.__notes__)
    assert not out.exists()


def test_preprocess_stage_reads_params(tmp_path, params_file):
    from bonemet.cli import main

    cohort = _write_cohort(tmp_path / "raw", n=2)
    params = {
        "data": {"cohort_dir": str(cohort), "mask_label": 1},
        "preprocess": {
            "target_spacing_mm": [1.5, 1.5, 1.5],
            "image_interpolator": "linear",
            "mask_interpolator": "nearest",
            "hu_window": [-200, 1800],
            "crop": {
                "bone_threshold_hu": 200,
                "min_component_ml": 0.01,
                "margin_mm": 3.0,
                "min_size_vox": [24, 24, 24],
            },
            "n_jobs": 1,
            "out_dir": str(tmp_path / "pre"),
        },
    }
    path = params_file(params)
    assert main(["preprocess", "--params", str(path), "--no-progress"]) == 0
    table = read_preprocessed(tmp_path / "pre")
    assert list(table["case_id"]) == ["case0", "case1"]
    assert sitk.ReadImage(table["image"][0]).GetSize() == (24, 24, 24)
    # --out and --n-jobs override preprocess.out_dir and preprocess.n_jobs
    assert main(["preprocess", "--params", str(path), "--out", str(tmp_path / "other"), "--n-jobs", "2",
                 "--no-progress"]) == 0
    assert list(read_preprocessed(tmp_path / "other")["case_id"]) == ["case0", "case1"]
    assert main(["preprocess", "--params", str(path), "--n-jobs", "0", "--no-progress"]) == 2


@pytest.mark.parametrize("interpolator", ["bspline", "linear"])
def test_crop_resampling_equals_full_resampling_then_crop(spec, interpolator):
    from bonemet.preprocessing import CropBox

    image, _ = _phantom(size=(60, 50, 24))
    options = spec.updated({"image_interpolator": interpolator, "crop.min_size_vox": [40, 8, 8]})
    result = preprocess_image(image, options)
    box = CropBox(tuple(result.geometry["crop_start_index"]), tuple(result.geometry["crop_size"]))
    full = resample_image(image, options.target_spacing_mm, interpolator)
    expected = normalise_intensity(crop_to_box(full, box, pad_value=-200.0), options.hu_window)
    assert result.image.GetOrigin() == pytest.approx(expected.GetOrigin())
    np.testing.assert_allclose(
        sitk.GetArrayViewFromImage(result.image), sitk.GetArrayViewFromImage(expected), atol=1e-4
    )


def test_non_identity_direction_keeps_lesion_and_maps_back(spec, tol):
    image, mask = _phantom(size=(60, 60, 24), radius_mm=5.0)
    direction = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # axes swapped and flipped
    image.SetDirection(direction)
    mask.SetDirection(direction)
    result = preprocess_case(image, mask, spec.updated({"target_spacing_mm": [1.0, 1.0, 1.0]}), grid_tolerance_mm=tol)
    assert result.image.GetDirection() == pytest.approx(direction)
    assert result.geometry["mask_voxels_outside_crop"] == 0
    assert dice(map_mask_to_original(result.mask, image, "nearest"), mask) > 0.85
    lo_c, hi_c = _physical_box(result.image, np.ones(result.image.GetSize()[::-1], bool))
    lo, hi = _physical_box(image, sitk.GetArrayViewFromImage(image) > 200)
    assert np.all(lo >= lo_c - 1.0) and np.all(hi <= hi_c + 1.0)
