"""Image I/O (NIfTI, NRRD, DICOM series) and manifest parsing."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from bonemet.data.io import ImageReadError, read_image, read_mask, same_grid, write_image
from bonemet.data.manifest import ManifestError, read_manifest


def _ct(size=(12, 10, 6), spacing=(0.8, 0.8, 2.0)) -> sitk.Image:
    arr = np.random.default_rng(0).integers(-1000, 1500, size=size[::-1]).astype(np.int16)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing(spacing)
    image.SetOrigin((10.0, -5.0, 3.0))
    return image


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd"])
def test_roundtrip_formats_keep_pixels_and_geometry(tmp_path, suffix):
    image = _ct()
    path = tmp_path / f"ct{suffix}"
    write_image(image, path)
    back = read_image(path)
    assert same_grid(image, back, tol_mm=1e-6)[0]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_dicom_series_applies_rescale_and_drops_patient_tags(tmp_path):
    arr = np.arange(4 * 6 * 5, dtype=np.int16).reshape(4, 6, 5) - 100
    folder = tmp_path / "dicom"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(arr.shape[0]):
        # GDCM stores (HU - intercept) / slope on disk; the reader must apply the rescale again.
        slice_ = sitk.GetImageFromArray(arr[k])
        slice_.SetSpacing((0.7, 0.7))
        for tag, value in {
            "0010|0010": "Doe^Jane",
            "0010|0020": "SECRET-ID-42",
            "0008|0060": "CT",
            "0020|000e": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.2",
            "0020|0032": f"0\\0\\{k * 2.5}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|0013": str(k + 1),
            "0018|0050": "2.5",
            "0028|1052": "-1024",
            "0028|1053": "1",
        }.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"s{k:03d}.dcm"))
        writer.Execute(slice_)
    raw = sitk.ImageFileReader()
    raw.SetFileName(str(folder / "s000.dcm"))
    raw.ReadImageInformation()
    assert raw.GetMetaData("0028|1052").strip() == "-1024"
    image = read_image(folder, case_id="P1")
    assert image.GetSize() == (5, 6, 4)
    assert image.GetSpacing()[2] == pytest.approx(2.5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), arr)
    assert not any("0010|" in key for key in image.GetMetaDataKeys())
    out = tmp_path / "out.nrrd"
    write_image(image, out)
    assert b"SECRET-ID-42" not in out.read_bytes() and b"Doe^Jane" not in out.read_bytes()


def test_corrupt_and_missing_files_name_the_case(tmp_path):
    path = tmp_path / "ct.nii.gz"
    write_image(_ct(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="case .C7.*(cannot be read|truncated)"):
        read_image(path, case_id="C7")
    with pytest.raises(ImageReadError, match="case 'C8'.*not found"):
        read_image(tmp_path / "nope.nii.gz", case_id="C8")


def test_read_mask_selects_label(tmp_path):
    arr = np.zeros((4, 4, 4), dtype=np.uint8)
    arr[1, 1, 1] = 1
    arr[2, 2, 2] = 2
    path = tmp_path / "m.nii.gz"
    write_image(sitk.GetImageFromArray(arr), path)
    assert sitk.GetArrayFromImage(read_mask(path, label=2)).sum() == 1
    assert sitk.GetArrayFromImage(read_mask(path, label=2))[2, 2, 2] == 1


def test_same_grid_reports_what_differs():
    a = _ct()
    b = _ct(spacing=(0.8, 0.8, 3.0))
    ok, reason = same_grid(a, b, tol_mm=0.01)
    assert not ok and "spacing" in reason
    # the tolerance (validate.grid_tolerance_mm) is the caller's: an origin 0.005 mm off passes at 0.01 mm only
    c = _ct()
    c.SetOrigin((10.005, -5.0, 3.0))
    assert same_grid(a, c, tol_mm=0.01)[0]
    ok, reason = same_grid(a, c, tol_mm=0.001)
    assert not ok and "origin" in reason


def test_manifest_parsing_and_errors(tmp_path):
    (tmp_path / "manifest.csv").write_text(
        "case_id,label,image,mask,scanner\nA,1,images/A.nii.gz,masks/A.nii.gz,GE\nB,0,images/B.nrrd,masks/B.nrrd,Siemens\n"
    )
    cases = read_manifest(tmp_path)
    assert [c.case_id for c in cases] == ["A", "B"]
    assert cases[0].image == tmp_path / "images/A.nii.gz"
    assert cases[1].metadata == {"scanner": "Siemens"}
    (tmp_path / "manifest.csv").write_text("case_id,label,image,mask\nA,1,a,b\nA,2,c,d\n")
    with pytest.raises(ManifestError) as err:
        read_manifest(tmp_path)
    assert "case 'A': duplicate case_id" in str(err.value) and "label '2'" in str(err.value)
    (tmp_path / "manifest.csv").write_text("case_id,label,image\nA,1,a\n")
    with pytest.raises(ManifestError, match="missing column"):
        read_manifest(tmp_path)


def test_compressed_nrrd_is_not_mistaken_for_truncated(tmp_path):
    image = _ct(size=(30, 30, 20))
    path = tmp_path / "ct.nrrd"
    write_image(image, path, compress=True)
    assert b"gzip" in path.read_bytes()[:400]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(path)), sitk.GetArrayFromImage(image))
    raw = tmp_path / "raw.nrrd"
    write_image(image, raw, compress=False)
    raw.write_bytes(raw.read_bytes()[:-500])
    with pytest.raises(ImageReadError):
        read_image(raw)
