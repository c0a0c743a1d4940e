"""DICOM CT series, RTSTRUCT and SEG masks (bonemet.data.dicom_series, bonemet.data.dicom_masks).

Every test makes its own small data: a 24x20x12 CT with an ellipsoid lesion (and a ring-shaped
slice) on a (0.8, 0.8, 2.0) mm grid with a non-zero origin, written as a DICOM series.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from matplotlib.path import Path as MplPath
from pydicom.dataset import Dataset

from bonemet.data.dicom_masks import (
    DicomWriteError,
    MaskFormatError,
    dicom_modality,
    read_lesion_mask,
    read_rtstruct_mask,
    read_seg_mask,
    rtstruct_roi_names,
    seg_segment_labels,
    write_rtstruct,
    write_seg,
)
from bonemet.data.dicom_series import (
    IDENTIFYING_KEYWORDS,
    series_instance_uid,
    slice_headers,
    write_dicom_series,
)
from bonemet.data.io import ImageReadError, read_image, read_mask, same_grid, write_image
from bonemet.data.synthetic import generate_cohort

SPACING = (0.8, 0.8, 2.0)
ORIGIN = (-12.3, 45.6, -300.25)
SHAPE = (12, 20, 24)  # (k, j, i)
RING_SLICE = 6
TOL = 0.01
_TILT = np.deg2rad(20)
DIRECTIONS = {
    "axial": np.eye(3),
    "flipped": np.diag([-1.0, -1.0, 1.0]),  # RAS-like rows and columns
    "oblique": np.array([[1, 0, 0], [0, np.cos(_TILT), -np.sin(_TILT)], [0, np.sin(_TILT), np.cos(_TILT)]]),
}


def _label_map() -> np.ndarray:
    kk, jj, ii = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    radius = np.sqrt(((ii - 11.3) * 0.8 / 6.5) ** 2 + ((jj - 9.6) * 0.8 / 5.0) ** 2 + ((kk - 5.5) * 2.0 / 7.0) ** 2)
    lesion = (radius < 1).astype(np.uint8)
    lesion[RING_SLICE, 8:12, 9:14] = 0  # a hole: the lesion is a ring on this slice
    return lesion


def _image(array: np.ndarray, direction: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(direction.ravel().tolist())
    return image


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def _md5(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


class Case:
    """A CT series on disk, the CT as read back, its lesion mask and its RTSTRUCT and SEG."""

    def __init__(self, root: Path, direction: np.ndarray, patient: dict | None = None):
        self.label = _label_map()
        hu = np.where(self.label > 0, 350, 40).astype(np.int16)
        hu[0, 0, :4] = (-1024, -1000, 0, 3000)
        self.hu = hu
        self.series = root / "ct"
        self.files = write_dicom_series(_image(hu, direction), self.series, patient=patient, series_description="test CT")
        self.ct = read_image(self.series)
        self.uid = series_instance_uid(self.series)
        self.mask = sitk.GetImageFromArray(self.label)
        self.mask.CopyInformation(self.ct)
        self.rtstruct = write_rtstruct(self.mask, self.series, root / "rs.dcm", "lesion", algorithm_type="MANUAL", grid_tolerance_mm=TOL)
        self.seg = write_seg(self.mask, self.series, root / "seg.dcm", algorithm_type="AUTOMATIC", grid_tolerance_mm=TOL)


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> Case:
    return Case(tmp_path_factory.mktemp("axial"), DIRECTIONS["axial"])


# ------------------------------------------------------------------------------------------
# CT series


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
def test_series_reads_back_on_the_same_grid_with_the_same_hu(tmp_path, name):
    hu = np.random.default_rng(0).integers(-1024, 3000, SHAPE).astype(np.int16)
    image = _image(hu, DIRECTIONS[name])
    files = write_dicom_series(image, tmp_path / "ct")
    assert [f.name for f in files] == [f"CT_{k:04d}.dcm" for k in range(SHAPE[0])]
    back = read_image(tmp_path / "ct")
    ok, reason = same_grid(image, back, tol_mm=1e-3)
    assert ok, reason
    np.testing.assert_array_equal(_array(back), hu)
    ds = pydicom.dcmread(files[3])
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage and ds.Modality == "CT"
    assert float(ds.RescaleSlope) == 1 and float(ds.RescaleIntercept) == -1024
    np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], (SPACING[1], SPACING[0]))
    np.testing.assert_allclose(float(ds.SliceThickness), SPACING[2])
    np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient],
                               image.TransformIndexToPhysicalPoint((0, 0, 3)), atol=1e-6)
    np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient],
                               np.concatenate([DIRECTIONS[name][:, 0], DIRECTIONS[name][:, 1]]), atol=1e-9)
    uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert len(uids) == len(files)
    assert all(pydicom.uid.UID(u).is_valid for u in (*uids, ds.SeriesInstanceUID, ds.StudyInstanceUID))


def test_series_identifying_tags_come_from_patient_only(tmp_path):
    patient = {"PatientName": "Doe^Jane", "PatientID": "MRN-0042", "PatientBirthDate": "19700101",
               "InstitutionName": "St Elsewhere", "AccessionNumber": "ACC-77", "ReferringPhysicianName": "House^G",
               "StudyDate": "20240229"}
    image = _image(np.zeros(SHAPE, np.int16), DIRECTIONS["axial"])
    ds = pydicom.dcmread(write_dicom_series(image, tmp_path / "named", patient=patient)[0])
    for keyword, value in patient.items():
        assert str(ds[keyword].value) == value
    plain = pydicom.dcmread(write_dicom_series(image, tmp_path / "plain")[0])
    assert str(plain.PatientName) == "ANONYMOUS^" and plain.PatientID == "ANONYMOUS"
    assert plain.PatientBirthDate == "" and plain.StudyDate == "" and "InstitutionName" not in plain
    assert set(patient) <= set(IDENTIFYING_KEYWORDS)


def test_series_refuses_what_it_cannot_write(tmp_path):
    image = _image(np.zeros(SHAPE, np.int16), DIRECTIONS["axial"])
    with pytest.raises(DicomWriteError, match="SeriesInstanceUID"):
        write_dicom_series(image, tmp_path / "a", patient={"SeriesInstanceUID": "1.2.3"})
    left = _image(np.zeros(SHAPE, np.int16), np.diag([1.0, 1.0, -1.0]))
    with pytest.raises(DicomWriteError, match="left-handed"):
        write_dicom_series(left, tmp_path / "b")
    with pytest.raises(DicomWriteError, match="integers"):
        write_dicom_series(sitk.Cast(image, sitk.sitkFloat32) + 0.5, tmp_path / "c")
    write_dicom_series(image, tmp_path / "d")
    with pytest.raises(DicomWriteError, match="overwrite=True"):
        write_dicom_series(image, tmp_path / "d")
    assert len(write_dicom_series(image, tmp_path / "d", overwrite=True)) == SHAPE[0]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_series_uid_from_headers_and_bad_folders(tmp_path, case):
    assert case.uid == str(pydicom.dcmread(case.files[0], stop_before_pixels=True).SeriesInstanceUID)
    assert len(slice_headers(case.series, case.ct)) == SHAPE[0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageReadError, match="case 'c7'.*no DICOM image slices"):
        series_instance_uid(tmp_path / "empty", case_id="c7")
    two = tmp_path / "two"
    shutil.copytree(case.series, two)
    other = write_dicom_series(_image(np.zeros(SHAPE, np.int16), DIRECTIONS["axial"]), tmp_path / "other")
    shutil.copy(other[0], two / "zz.dcm")
    with pytest.raises(ImageReadError, match="2 DICOM series"):
        series_instance_uid(two)


# ------------------------------------------------------------------------------------------
# RTSTRUCT


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
def test_rtstruct_round_trip(tmp_path, name):
    case = Case(tmp_path, DIRECTIONS[name])
    mask = read_rtstruct_mask(case.rtstruct, case.ct, "lesion", case_id="c1", reference_series_uid=case.uid)
    assert mask.GetPixelID() == sitk.sitkUInt8
    assert same_grid(case.ct, mask, tol_mm=TOL)[0]
    assert _dice(_array(mask), case.label) >= 0.95
    np.testing.assert_array_equal(_array(mask), case.label)  # the iso-line contours round-trip exactly


def test_rtstruct_ring_keeps_its_hole(case):
    ds = pydicom.dcmread(case.rtstruct)
    ring_uid = pydicom.dcmread(case.files[RING_SLICE], stop_before_pixels=True).SOPInstanceUID
    on_ring = [c for c in ds.ROIContourSequence[0].ContourSequence
               if c.ContourImageSequence[0].ReferencedSOPInstanceUID == ring_uid]
    assert len(on_ring) == 2  # outline and hole
    mask = _array(read_rtstruct_mask(case.rtstruct, case.ct, "lesion", case_id="c1"))
    assert not mask[RING_SLICE, 8:12, 9:14].any()
    np.testing.assert_array_equal(mask[RING_SLICE], case.label[RING_SLICE])


def test_rtstruct_references_the_series(case):
    ds = pydicom.dcmread(case.rtstruct)
    assert ds.Modality == "RTSTRUCT" and ds.SOPClassUID == pydicom.uid.RTStructureSetStorage
    series = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == case.uid
    sop_uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in case.files}
    assert {str(i.ReferencedSOPInstanceUID) for i in series.ContourImageSequence} == sop_uids
    contours = ds.ROIContourSequence[0].ContourSequence
    assert {str(c.ContourImageSequence[0].ReferencedSOPInstanceUID) for c in contours} <= sop_uids
    assert all(c.ContourGeometricType == "CLOSED_PLANAR" and c.NumberOfContourPoints * 3 == len(c.ContourData)
               for c in contours)
    assert ds.StructureSetROISequence[0].ROIName == "lesion"
    assert ds.StructureSetROISequence[0].ROIGenerationAlgorithm == "MANUAL"
    assert ds.StudyInstanceUID == pydicom.dcmread(case.files[0], stop_before_pixels=True).StudyInstanceUID
    assert rtstruct_roi_names(case.rtstruct) == ["lesion"]


def _handmade_rtstruct(path: Path, rois: dict[str, list[np.ndarray]], series_uid: str = "1.2.3.4",
                       geometric_type: str = "CLOSED_PLANAR") -> Path:
    """An RTSTRUCT as another tool would write it: ROI name -> contours (N, 3) in mm."""
    ds = Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.RTStructureSetStorage
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID = pydicom.uid.RTStructureSetStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "RTSTRUCT"
    series, study, frame = Dataset(), Dataset(), Dataset()
    series.SeriesInstanceUID = series_uid
    study.RTReferencedSeriesSequence = [series]
    frame.RTReferencedStudySequence = [study]
    ds.ReferencedFrameOfReferenceSequence = [frame]
    ds.StructureSetROISequence, ds.ROIContourSequence = [], []
    for number, (name, contours) in enumerate(rois.items(), start=1):
        roi, roi_contour = Dataset(), Dataset()
        roi.ROINumber, roi.ROIName = number, name
        roi_contour.ReferencedROINumber = number
        roi_contour.ContourSequence = []
        for points in contours:
            item = Dataset()
            item.ContourGeometricType = geometric_type
            item.NumberOfContourPoints = len(points)
            item.ContourData = [f"{v:.6f}" for v in np.asarray(points, float).ravel()]
            roi_contour.ContourSequence.append(item)
        ds.StructureSetROISequence.append(roi)
        ds.ROIContourSequence.append(roi_contour)
    ds.save_as(path, enforce_file_format=True)
    return path


def _polygon_mm(image: sitk.Image, k: int, ij: np.ndarray) -> np.ndarray:
    return np.array([image.TransformContinuousIndexToPhysicalPoint((float(i), float(j), float(k))) for i, j in ij])


@pytest.mark.parametrize("name", ["axial", "oblique"])
def test_rtstruct_even_odd_matches_an_independent_point_in_polygon(tmp_path, name):
    """Islands, a hole and a concave polygon on one slice, against matplotlib's point-in-polygon."""
    image = _image(np.zeros(SHAPE, np.int16), DIRECTIONS[name])
    outer = np.array([[2.2, 1.7], [20.6, 2.3], [19.1, 17.8], [3.4, 16.2]])
    hole = np.array([[7.1, 6.3], [14.8, 6.9], [13.2, 12.6], [8.4, 11.1]])
    concave = np.array([[1.3, 18.6], [9.7, 18.2], [5.2, 18.9], [9.9, 19.4], [1.1, 19.3]])
    island = np.array([[21.2, 10.4], [23.4, 11.9], [21.9, 14.6]])
    polygons = [outer, hole, concave, island]
    path = _handmade_rtstruct(tmp_path / "rs.dcm", {"body": [_polygon_mm(image, 4, p) for p in polygons]})
    mask = _array(read_rtstruct_mask(path, image, "body", case_id="c1"))
    jj, ii = np.mgrid[: SHAPE[1], : SHAPE[2]]
    centres = np.column_stack([ii.ravel(), jj.ravel()])
    inside = np.zeros(centres.shape[0], dtype=int)
    for polygon in polygons:
        inside += MplPath(polygon).contains_points(centres)
    expected = (inside % 2).reshape(SHAPE[1], SHAPE[2])
    np.testing.assert_array_equal(mask[4], expected)
    assert mask.sum() == expected.sum() > 50 and not mask[[0, 1, 2, 3, 5, 6]].any()


def test_rtstruct_from_a_synthetic_cohort_case(tmp_path):
    generate_cohort(tmp_path / "cohort", n_cases=2, n_positive=1, seed=5, size="small", mask_label=1,
                    overwrite=True, show_progress=False)
    image = read_image(tmp_path / "cohort" / "images" / "case_000.nii.gz")
    label = read_mask(tmp_path / "cohort" / "masks" / "case_000.nii.gz", label=1)
    write_dicom_series(image, tmp_path / "ct")
    ct = read_image(tmp_path / "ct")
    label.CopyInformation(ct)
    write_rtstruct(label, tmp_path / "ct", tmp_path / "rs.dcm", "metastasis", algorithm_type="AUTOMATIC", grid_tolerance_mm=TOL)
    write_seg(label, tmp_path / "ct", tmp_path / "seg.dcm", algorithm_type="MANUAL", grid_tolerance_mm=TOL)
    uid = series_instance_uid(tmp_path / "ct")
    from_rt = read_rtstruct_mask(tmp_path / "rs.dcm", ct, "metastasis", case_id="case_000", reference_series_uid=uid)
    assert _dice(_array(from_rt), _array(label)) >= 0.95
    # The NIfTI CT is on the same physical grid: the RTSTRUCT reads onto it as well.
    assert _dice(_array(read_rtstruct_mask(tmp_path / "rs.dcm", image, "metastasis", case_id="case_000")),
                 _array(label)) >= 0.95
    from_seg = read_seg_mask(tmp_path / "seg.dcm", ct, 1, case_id="case_000", grid_tolerance_mm=TOL,
                             reference_series_uid=uid)
    np.testing.assert_array_equal(_array(from_seg), _array(label))


# ------------------------------------------------------------------------------------------
# SEG


def test_seg_round_trip_is_exact(case):
    by_label = read_seg_mask(case.seg, case.ct, "lesion", case_id="c1", grid_tolerance_mm=TOL,
                             reference_series_uid=case.uid)
    by_number = read_seg_mask(case.seg, case.ct, 1, case_id="c1", grid_tolerance_mm=TOL)
    np.testing.assert_array_equal(_array(by_label), case.label)
    np.testing.assert_array_equal(_array(by_number), case.label)
    assert by_label.GetPixelID() == sitk.sitkUInt8 and same_grid(case.ct, by_label, tol_mm=TOL)[0]
    assert seg_segment_labels(case.seg) == {1: "lesion"}


@pytest.mark.parametrize("name", ["flipped", "oblique"])
def test_seg_round_trip_other_directions(tmp_path, name):
    case = Case(tmp_path, DIRECTIONS[name])
    mask = read_seg_mask(case.seg, case.ct, "lesion", case_id="c1", grid_tolerance_mm=TOL, reference_series_uid=case.uid)
    np.testing.assert_array_equal(_array(mask), case.label)


def test_seg_metadata(case, tmp_path):
    ds = pydicom.dcmread(case.seg)
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    segment = ds.SegmentSequence[0]
    assert segment.SegmentLabel == "lesion" and segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentAlgorithmName == "bonemet MISSU"
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == case.uid
    assert ds.FrameOfReferenceUID == pydicom.dcmread(case.files[0], stop_before_pixels=True).FrameOfReferenceUID
    assert int(ds.NumberOfFrames) == int(case.label.reshape(SHAPE[0], -1).any(axis=1).sum())  # empty frames omitted
    manual = write_seg(case.mask, case.series, tmp_path / "manual.dcm", algorithm_type="MANUAL", grid_tolerance_mm=TOL, segment_label="met")
    segment = pydicom.dcmread(manual).SegmentSequence[0]
    assert segment.SegmentAlgorithmType == "MANUAL" and "SegmentAlgorithmName" not in segment
    assert seg_segment_labels(manual) == {1: "met"}


def _other_tools_seg(case: Case, path: Path, pixels: np.ndarray, seg_type: str, labels: list[str]) -> Path:
    """A SEG made with highdicom directly, as another tool would (several segments, other types)."""
    import highdicom as hd

    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n, segment_label=label,
            segmented_property_category=hd.sr.CodedConcept("49755003", "SCT", "Morphologically Abnormal Structure"),
            segmented_property_type=hd.sr.CodedConcept("52988006", "SCT", "Lesion"), algorithm_type="MANUAL")
        for n, label in enumerate(labels, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=slice_headers(case.series, case.ct), pixel_array=pixels, segmentation_type=seg_type,
        segment_descriptions=descriptions, series_instance_uid=pydicom.uid.generate_uid(), series_number=1,
        sop_instance_uid=pydicom.uid.generate_uid(), instance_number=1, manufacturer="t",
        manufacturer_model_name="t", software_versions="1", device_serial_number="1")
    seg.save_as(path)
    return path


def _fractional_seg(case: Case, path: Path) -> Path:
    return _other_tools_seg(case, path, case.label.astype(np.float32) * 0.7, "FRACTIONAL", ["p"])


@pytest.mark.parametrize("seg_type", ["BINARY", "LABELMAP"])
def test_seg_with_several_segments(case, tmp_path, seg_type):
    bone = np.zeros_like(case.label)
    bone[2:10, 2:6, 3:20] = 1
    bone[case.label > 0] = 0
    labels = (case.label + 2 * bone).astype(np.uint8)  # label-map style: 1 lesion, 2 bone
    path = _other_tools_seg(case, tmp_path / "two.dcm", labels, seg_type, ["lesion", "bone"])
    assert seg_segment_labels(path) == {1: "lesion", 2: "bone"}
    np.testing.assert_array_equal(_array(read_seg_mask(path, case.ct, "bone", case_id="c1", grid_tolerance_mm=TOL)), bone)
    np.testing.assert_array_equal(_array(read_seg_mask(path, case.ct, 1, case_id="c1", grid_tolerance_mm=TOL)),
                                  case.label)


# ------------------------------------------------------------------------------------------
# Dispatch


def test_read_lesion_mask_dispatches_the_three_formats(case, tmp_path):
    label_map = sitk.GetImageFromArray((case.label * 2).astype(np.uint8))
    label_map.CopyInformation(case.ct)
    write_image(label_map, tmp_path / "mask.nii.gz")
    common = dict(case_id="c1", grid_tolerance_mm=TOL, reference_series_uid=case.uid)
    from_nifti = read_lesion_mask(tmp_path / "mask.nii.gz", case.ct, label=2, roi=None, seg_segment=None, **common)
    from_rt = read_lesion_mask(case.rtstruct, case.ct, label=1, roi="lesion", seg_segment=None, **common)
    from_seg = read_lesion_mask(case.seg, case.ct, label=1, roi=None, seg_segment="lesion", **common)
    # A DICOM file whatever its name: a SEG without suffix is still found.
    renamed = shutil.copy(case.seg, tmp_path / "segmentation")
    from_renamed = read_lesion_mask(renamed, case.ct, label=1, roi=None, seg_segment=1, **common)
    for mask in (from_nifti, from_rt, from_seg, from_renamed):
        assert mask.GetPixelID() == sitk.sitkUInt8 and same_grid(case.ct, mask, tol_mm=TOL)[0]
        np.testing.assert_array_equal(_array(mask), case.label)
    assert dicom_modality(case.rtstruct) == "RTSTRUCT" and dicom_modality(case.seg) == "SEG"
    assert dicom_modality(tmp_path / "mask.nii.gz") is None


def test_read_lesion_mask_needs_roi_or_segment(case):
    common = dict(label=1, case_id="c9", grid_tolerance_mm=TOL)
    with pytest.raises(MaskFormatError, match=r"case 'c9'.*rs\.dcm.*ROI name.*'lesion'"):
        read_lesion_mask(case.rtstruct, case.ct, roi=None, seg_segment=None, **common)
    with pytest.raises(MaskFormatError, match=r"case 'c9'.*seg\.dcm.*needs the lesion's segment.*1 'lesion'"):
        read_lesion_mask(case.seg, case.ct, roi=None, seg_segment=None, **common)
    with pytest.raises(MaskFormatError, match=r"CT_0000\.dcm: a DICOM CT file, not a mask"):
        read_lesion_mask(case.files[0], case.ct, roi="lesion", seg_segment=1, **common)


def test_read_lesion_mask_label_map_off_grid(case, tmp_path):
    shifted = sitk.GetImageFromArray(case.label)
    shifted.CopyInformation(case.ct)
    shifted.SetOrigin(tuple(np.add(ORIGIN, (0.0, 0.0, 1.0))))
    write_image(shifted, tmp_path / "shifted.nii.gz")
    with pytest.raises(MaskFormatError, match=r"case 'c1'.*shifted\.nii\.gz.*not on the image's grid.*origin"):
        read_lesion_mask(tmp_path / "shifted.nii.gz", case.ct, label=1, roi=None, seg_segment=None, case_id="c1",
                         grid_tolerance_mm=TOL)


# ------------------------------------------------------------------------------------------
# Errors: each names the case and the file, and says what exists


def test_unknown_roi_lists_the_rois(case, tmp_path):
    contour = _polygon_mm(case.ct, 3, np.array([[2.0, 2.0], [9.0, 2.0], [9.0, 9.0]]))
    path = _handmade_rtstruct(tmp_path / "two.dcm", {"GTV_bone": [contour], "Spinal cord": [contour]})
    with pytest.raises(MaskFormatError) as info:
        read_rtstruct_mask(path, case.ct, "lesion", case_id="c42")
    message = str(info.value)
    assert "case 'c42'" in message and "two.dcm" in message and "'lesion'" in message
    assert "'GTV_bone', 'Spinal cord'" in message and "roi" in message
    assert isinstance(info.value, ImageReadError)
    duplicate = _handmade_rtstruct(tmp_path / "dup.dcm", {"a": [contour]})
    ds = pydicom.dcmread(duplicate)
    ds.StructureSetROISequence.append(Dataset())
    ds.StructureSetROISequence[1].ROINumber, ds.StructureSetROISequence[1].ROIName = 2, "a"
    ds.save_as(duplicate)
    with pytest.raises(MaskFormatError, match="2 ROIs are named 'a'"):
        read_rtstruct_mask(duplicate, case.ct, "a", case_id="c42")


def test_empty_roi(case, tmp_path):
    path = _handmade_rtstruct(tmp_path / "empty.dcm", {"lesion": []})
    with pytest.raises(MaskFormatError, match=r"case 'c3'.*empty\.dcm.*ROI 'lesion' has no contour"):
        read_rtstruct_mask(path, case.ct, "lesion", case_id="c3")
    tiny = _polygon_mm(case.ct, 3, np.array([[4.2, 4.2], [4.6, 4.2], [4.4, 4.7]]))  # between voxel centres
    path = _handmade_rtstruct(tmp_path / "tiny.dcm", {"lesion": [tiny]})
    with pytest.raises(MaskFormatError, match=r"case 'c3'.*tiny\.dcm.*encloses no voxel centre"):
        read_rtstruct_mask(path, case.ct, "lesion", case_id="c3")


def test_structure_outside_the_image(case):
    moved = sitk.Image(case.ct)
    moved.SetOrigin(tuple(np.add(ORIGIN, (0.0, 0.0, 200.0))))  # same slice planes, 100 slices away
    with pytest.raises(MaskFormatError, match=r"case 'c4'.*rs\.dcm.*ROI 'lesion' lies outside the image"):
        read_rtstruct_mask(case.rtstruct, moved, "lesion", case_id="c4")
    cropped = case.ct[:, :, 4:8]
    with pytest.raises(MaskFormatError, match=r"ROI 'lesion' extends outside the image \(\d+ of \d+ contours"):
        read_rtstruct_mask(case.rtstruct, cropped, "lesion", case_id="c4")
    in_plane = case.ct[6:, :, :]
    with pytest.raises(MaskFormatError, match="extends outside the image"):
        read_rtstruct_mask(case.rtstruct, in_plane, "lesion", case_id="c4")


def test_contours_off_the_slice_planes(case):
    between = sitk.Image(case.ct)
    between.SetOrigin(tuple(np.add(ORIGIN, (0.0, 0.0, 1.0))))  # planes half a slice away
    with pytest.raises(MaskFormatError, match=r"case 'c5'.*not on a slice plane of the image"):
        read_rtstruct_mask(case.rtstruct, between, "lesion", case_id="c5")
    tilted = sitk.Image(case.ct)
    tilted.SetDirection(DIRECTIONS["oblique"].ravel().tolist())
    with pytest.raises(MaskFormatError, match="not on a slice plane"):
        read_rtstruct_mask(case.rtstruct, tilted, "lesion", case_id="c5")


def test_rtstruct_of_another_series(case):
    with pytest.raises(MaskFormatError) as info:
        read_rtstruct_mask(case.rtstruct, case.ct, "lesion", case_id="c6", reference_series_uid="1.2.3.999")
    message = str(info.value)
    assert "case 'c6'" in message and "rs.dcm" in message and case.uid in message and "1.2.3.999" in message


def test_rtstruct_with_open_contours(case, tmp_path):
    points = _polygon_mm(case.ct, 3, np.array([[2.0, 2.0], [9.0, 2.0], [9.0, 9.0]]))
    path = _handmade_rtstruct(tmp_path / "points.dcm", {"marker": [points]}, geometric_type="POINT")
    with pytest.raises(MaskFormatError, match=r"case 'c1'.*points\.dcm.*type POINT"):
        read_rtstruct_mask(path, case.ct, "marker", case_id="c1")


def test_unknown_segment_lists_the_segments(case):
    with pytest.raises(MaskFormatError) as info:
        read_seg_mask(case.seg, case.ct, 3, case_id="c8", grid_tolerance_mm=TOL)
    message = str(info.value)
    assert "case 'c8'" in message and "seg.dcm" in message and "no segment number 3" in message
    assert "1 'lesion'" in message
    with pytest.raises(MaskFormatError, match=r"no segment labelled 'tumour'.*1 'lesion'"):
        read_seg_mask(case.seg, case.ct, "tumour", case_id="c8", grid_tolerance_mm=TOL)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda im: im.SetSpacing((0.9, 0.8, 2.0)), "pixel spacing"),
        (lambda im: im.SetSpacing((0.8, 0.8, 2.5)), "slice spacing or origin"),
        (lambda im: im.SetOrigin(tuple(np.add(ORIGIN, (0.4, 0.0, 0.0)))), "slice spacing or origin"),
        (lambda im: im.SetDirection(DIRECTIONS["oblique"].ravel().tolist()), "orientation"),
    ],
)
def test_seg_on_another_grid(case, change, expected):
    other = sitk.Image(case.ct)
    change(other)
    with pytest.raises(MaskFormatError) as info:
        read_seg_mask(case.seg, other, 1, case_id="c10", grid_tolerance_mm=TOL)
    message = str(info.value)
    assert "case 'c10'" in message and "seg.dcm" in message and "not on the image's grid" in message
    assert expected in message


def test_seg_frames_outside_or_another_size(case):
    with pytest.raises(MaskFormatError, match=r"case 'c11'.*frames are 24x20 pixels, the image's slices 20x20"):
        read_seg_mask(case.seg, case.ct[:20], 1, case_id="c11", grid_tolerance_mm=TOL)
    with pytest.raises(MaskFormatError, match="outside the image's 4 slices"):
        read_seg_mask(case.seg, case.ct[:, :, :4], 1, case_id="c11", grid_tolerance_mm=TOL)


def test_seg_of_another_series(case):
    with pytest.raises(MaskFormatError) as info:
        read_seg_mask(case.seg, case.ct, 1, case_id="c12", grid_tolerance_mm=TOL, reference_series_uid="1.2.3.999")
    assert "case 'c12'" in str(info.value) and case.uid in str(info.value) and "1.2.3.999" in str(info.value)


def test_fractional_seg_is_refused(case, tmp_path):
    path = _fractional_seg(case, tmp_path / "fractional.dcm")
    with pytest.raises(MaskFormatError, match=r"case 'c13'.*fractional\.dcm.*FRACTIONAL.*BINARY"):
        read_seg_mask(path, case.ct, 1, case_id="c13", grid_tolerance_mm=TOL)


def test_unreadable_not_dicom_and_wrong_modality(case, tmp_path):
    text = tmp_path / "notes.dcm"
    text.write_text("not a DICOM file at all\n" * 20)
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(case.rtstruct.read_bytes()[:700])
    for reader in (lambda p: read_rtstruct_mask(p, case.ct, "lesion", case_id="c14"),
                   lambda p: read_seg_mask(p, case.ct, 1, case_id="c14", grid_tolerance_mm=TOL)):
        with pytest.raises(MaskFormatError, match=r"case 'c14'.*notes\.dcm: not a DICOM file") as info:
            reader(text)
        assert info.value.__cause__ is not None
        with pytest.raises(MaskFormatError, match=r"case 'c14'.*truncated\.dcm"):
            reader(truncated)
        with pytest.raises(MaskFormatError, match=r"case 'c14'.*missing\.dcm: file not found"):
            reader(tmp_path / "missing.dcm")
    with pytest.raises(MaskFormatError, match=r"case 'c14'.*seg\.dcm: a DICOM file of modality 'SEG', expected RTSTRUCT"):
        read_rtstruct_mask(case.seg, case.ct, "lesion", case_id="c14")
    with pytest.raises(MaskFormatError, match=r"CT_0000\.dcm: a DICOM file of modality 'CT', expected SEG"):
        read_seg_mask(case.files[0], case.ct, 1, case_id="c14", grid_tolerance_mm=TOL)


def test_malformed_files(case, tmp_path):
    ds = pydicom.dcmread(case.rtstruct)
    ds.ROIContourSequence[0].ContourSequence[0].ContourData = ds.ROIContourSequence[0].ContourSequence[0].ContourData[:-1]
    ds.save_as(tmp_path / "bad_rt.dcm")
    with pytest.raises(MaskFormatError, match=r"case 'c15'.*bad_rt\.dcm: malformed or truncated RTSTRUCT.*multiple of 3") as info:
        read_rtstruct_mask(tmp_path / "bad_rt.dcm", case.ct, "lesion", case_id="c15")
    assert isinstance(info.value.__cause__, ValueError)
    seg = pydicom.dcmread(case.seg)
    del seg.SegmentSequence
    seg.save_as(tmp_path / "bad_seg.dcm")
    with pytest.raises(MaskFormatError, match=r"case 'c15'.*bad_seg\.dcm: malformed DICOM SEG"):
        read_seg_mask(tmp_path / "bad_seg.dcm", case.ct, 1, case_id="c15", grid_tolerance_mm=TOL)


def test_messages_carry_no_patient_data(tmp_path):
    case = Case(tmp_path, DIRECTIONS["axial"], patient={"PatientName": "Secretname^Ada", "PatientID": "MRN-991"})
    assert str(pydicom.dcmread(case.rtstruct).PatientName) == "Secretname^Ada"  # filed with the patient's study
    for call in (lambda: read_rtstruct_mask(case.rtstruct, case.ct, "x", case_id="c16"),
                 lambda: read_seg_mask(case.seg, case.ct, 9, case_id="c16", grid_tolerance_mm=TOL)):
        with pytest.raises(MaskFormatError) as info:
            call()
        assert "Secretname" not in str(info.value) and "MRN-991" not in str(info.value)


# ------------------------------------------------------------------------------------------
# Writers


def test_writers_refuse_bad_masks(case, tmp_path):
    for writer in (lambda m, p: write_rtstruct(m, case.series, p, "lesion", algorithm_type="MANUAL", grid_tolerance_mm=TOL),
                   lambda m, p: write_seg(m, case.series, p, algorithm_type="MANUAL", grid_tolerance_mm=TOL)):
        labels = sitk.GetImageFromArray((case.label * 2).astype(np.uint8))
        labels.CopyInformation(case.ct)
        with pytest.raises(DicomWriteError, match="binary 0/1"):
            writer(labels, tmp_path / "a.dcm")
        empty = sitk.Image(case.mask) * 0
        with pytest.raises(DicomWriteError, match="empty"):
            writer(empty, tmp_path / "b.dcm")
        with pytest.raises(DicomWriteError, match="not on the grid of the series"):
            writer(case.mask[:, :, 2:], tmp_path / "c.dcm")
        assert not list(tmp_path.iterdir())  # nothing half-written
    with pytest.raises(DicomWriteError, match="AUTOMATIC' or 'MANUAL'"):
        write_seg(case.mask, case.series, tmp_path / "d.dcm", algorithm_type="auto", grid_tolerance_mm=TOL)


def test_readers_leave_files_untouched(case):
    before = {p: _md5(p) for p in (case.rtstruct, case.seg, *case.files)}
    ct_before = _array(case.ct).copy()
    read_rtstruct_mask(case.rtstruct, case.ct, "lesion", case_id="c1", reference_series_uid=case.uid)
    read_seg_mask(case.seg, case.ct, 1, case_id="c1", grid_tolerance_mm=TOL, reference_series_uid=case.uid)
    series_instance_uid(case.series)
    assert before == {p: _md5(p) for p in before}
    np.testing.assert_array_equal(_array(case.ct), ct_before)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
def test_written_files_pass_the_dicom3tools_validator(case):
    for path in (case.files[0], case.rtstruct, case.seg):
        result = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True, check=False)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{path.name}: {errors}"


@pytest.mark.filterwarnings("ignore:Unknown encoding:UserWarning")  # pydicom, on a cut character set
@pytest.mark.parametrize("kind", ["rtstruct", "seg"])
def test_a_file_cut_short_is_an_error_never_a_smaller_lesion(case, tmp_path, kind):
    """pydicom reads a cut file silently; every cut gives our error or the whole lesion."""
    source = case.rtstruct if kind == "rtstruct" else case.seg
    data = source.read_bytes()
    cut = tmp_path / "cut.dcm"
    outcomes = set()
    for n in range(0, len(data), 41):
        cut.write_bytes(data[:n])
        try:
            if kind == "rtstruct":
                mask = read_rtstruct_mask(cut, case.ct, "lesion", case_id="c17")
            else:
                mask = read_seg_mask(cut, case.ct, 1, case_id="c17", grid_tolerance_mm=TOL)
        except MaskFormatError as exc:
            assert "case 'c17'" in str(exc) and "cut.dcm" in str(exc)
            outcomes.add("error")
        else:
            np.testing.assert_array_equal(_array(mask), case.label)
            outcomes.add("whole")
    assert "error" in outcomes
