"""Lesion masks in the DICOM formats radiologists export: RTSTRUCT and SEG.

Every reader returns a uint8 0/1 mask on the reference image's grid (physical space, mm,
LPS); :func:`read_lesion_mask` picks the reader from the file (a DICOM RTSTRUCT, a DICOM SEG,
or a label map read by :func:`bonemet.data.io.read_mask`).

RTSTRUCT. An ROI is a set of planar polygons (ContourData, mm in patient coordinates, which
are ITK's LPS physical coordinates). We rasterise them with our own scan-line filler over
pydicom and numpy, for three reasons: rt-utils pulls in opencv-python (a 60 MB binary) and
only reads masks on the DICOM series it was given, not on an image we already hold (a NIfTI
copy, a series read by SimpleITK); dcmrtstruct2nii converts folders to NIfTI files rather
than returning arrays; and the filler is about sixty lines of numpy whose rule we control.
The rule is the one DICOM intends (PS3.3 C.8.8.6): a voxel is inside when its centre is
enclosed by an odd number of the ROI's contours on its slice (even-odd), so a contour inside
another is a hole and several contours on a slice are several islands. Contours are mapped
through the inverse of the image's affine, so axial, flipped and oblique grids all work, as
long as each contour lies on one slice plane of the image. Writing uses contourpy (already
installed with matplotlib) to trace the 0.5 iso-line of each slice of the mask, a polygon
between voxel centres inside and outside, so that writing then reading gives the same voxels.

SEG. Read and written with highdicom (the reference implementation of the DICOM
Segmentation IOD, used by 3D Slicer's and OHIF's tooling). Reading places each frame by its
own ImagePositionPatient on the reference grid instead of asking highdicom for a volume: SEG
files usually omit empty frames, and a volume inferred from the remaining frames can get the
slice spacing wrong (frames on slices 3 and 7 only look like a 4-slice spacing).

Errors are :class:`MaskFormatError` (an :class:`~bonemet.data.io.ImageReadError`) whose
message names the case, the file, what was expected, what was found and the fix. Exceptions
of pydicom and highdicom on a user's file are caught where those libraries are called and
re-raised as ours. Patient-identifying tags are never logged nor put in messages.
"""

from __future__ import annotations

import datetime
import io
import logging
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid

from bonemet import __version__
from bonemet.data.dicom_series import (
    DicomWriteError,
    dicom_truncation,
    grid_affine,
    series_instance_uid,
    slice_headers,
)
from bonemet.data.io import IMAGE_SUFFIXES, ImageReadError, describe_path, read_image, read_mask, same_grid
from bonemet.utils import atomic_path

log = logging.getLogger(__name__)

__all__ = [
    "DicomWriteError",
    "MaskFormatError",
    "dicom_modality",
    "mask_format",
    "read_lesion_mask",
    "read_rtstruct_mask",
    "read_seg_mask",
    "rtstruct_roi_names",
    "seg_segment_labels",
    "series_instance_uid",
    "write_rtstruct",
    "write_seg",
]

AlgorithmType = Literal["AUTOMATIC", "MANUAL"]

# A contour belongs to the slice whose plane is nearest; all its points must be within this
# fraction of the slice spacing of that plane (a contour between planes or on a tilted plane
# was drawn on another grid). Clinical exports round coordinates to ~1e-6 mm.
_PLANE_TOL_SLICES = 0.25
# Contour points may reach the outer faces of the border voxels (half a voxel beyond their
# centres), plus this much for rounding in the decimal strings.
_EXTENT_TOL_VOXELS = 1e-3
# Direction cosines of a SEG frame must match the image's as closely as same_grid requires.
_DIRECTION_TOL = 1e-4
_STUDY_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"  # the study reference every RTSTRUCT writer uses
_SEG_MODALITIES = ("SEG",)
# Attributes an RTSTRUCT copies from its image series so that viewers file it with the study.
_COPIED_FROM_SERIES = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "StudyDescription",
    "AccessionNumber",
    "ReferringPhysicianName",
)
_LESION_CATEGORY = ("49755003", "SCT", "Morphologically Abnormal Structure")
_LESION_TYPE = ("52988006", "SCT", "Lesion")


# What pydicom and highdicom raise on a malformed file's content (parsed lazily, on access).
_MALFORMED = (
    AttributeError, KeyError, ValueError, TypeError, IndexError, OSError, EOFError, struct.error, BytesLengthException
)


class MaskFormatError(ImageReadError):
    """A DICOM mask (RTSTRUCT or SEG) cannot be read as a lesion mask on the given image."""


# ---------------------------------------------------------------------------------------------
# Reading DICOM files


def dicom_modality(path: str | Path, *, case_id: str | None = None) -> str | None:
    """The Modality of a DICOM file (e.g. 'RTSTRUCT', 'SEG', 'CT'), or None if it is not DICOM.

    Reads the header only. A file that is not DICOM (NIfTI, NRRD, text...) gives None.

    Raises:
        MaskFormatError: a DICOM file too damaged to read its header.
    """
    path = Path(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality", "SOPClassUID"])
    except (InvalidDicomError, EOFError, IsADirectoryError):
        return None
    except (OSError, ValueError, KeyError, TypeError, struct.error, BytesLengthException) as exc:
        raise MaskFormatError(f"{describe_path(path, case_id)}: a damaged DICOM file ({exc}); export it again") from exc
    return str(ds.get("Modality", "")).strip().upper() or None


def _read_dicom(path: Path, where: str, modality: str, fix: str) -> Dataset:
    """The whole DICOM file, checked to have ``modality``."""
    if not path.is_file():
        raise MaskFormatError(f"{where}: file not found; {fix}")
    try:
        data = path.read_bytes()
        ds = pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError as exc:
        raise MaskFormatError(f"{where}: not a DICOM file; expected a DICOM {modality}; {fix}") from exc
    except (OSError, EOFError, ValueError, KeyError, TypeError, struct.error, BytesLengthException) as exc:
        raise MaskFormatError(f"{where}: unreadable or truncated DICOM file ({exc}); {fix}") from exc
    problem = dicom_truncation(data)
    if problem:
        raise MaskFormatError(f"{where}: truncated or damaged DICOM file ({problem}); {fix}")
    found = str(ds.get("Modality", "")).strip().upper()
    if found != modality:
        raise MaskFormatError(
            f"{where}: a DICOM file of modality '{found or 'none'}', expected {modality}; {fix}"
        )
    return ds


def _check_referenced_series(
    referenced: set[str], reference_series_uid: str | None, where: str, kind: str
) -> None:
    """Raise unless the mask file references the image's series (when both are known)."""
    if reference_series_uid is None:
        return
    if not referenced:
        log.warning("%s: the %s names no referenced series; cannot check it was drawn on this image", where, kind)
        return
    if reference_series_uid not in referenced:
        raise MaskFormatError(
            f"{where}: the {kind} was drawn on series {', '.join(sorted(referenced))}, not on the image's "
            f"series {reference_series_uid}; give the {kind} exported from this image's series"
        )


def _check_reference_image(reference_image: sitk.Image, where: str) -> None:
    if reference_image.GetDimension() != 3:
        raise MaskFormatError(f"{where}: the reference image is {reference_image.GetDimension()}D; expected a 3D CT")


# ---------------------------------------------------------------------------------------------
# RTSTRUCT


@dataclass(frozen=True)
class _Contour:
    geometric_type: str
    points_mm: np.ndarray  # (N, 3) LPS mm


@dataclass(frozen=True)
class _StructureSet:
    roi_names: dict[int, str]  # ROINumber -> ROIName
    contours: dict[int, list[_Contour]]  # ROINumber -> its contours
    referenced_series: set[str]


def _parse_rtstruct(ds: Dataset) -> _StructureSet:
    """Pull the ROIs, their contours and the referenced series out of an RTSTRUCT dataset.

    Only pydicom access happens here, so that any error it raises means a malformed file.
    """
    for keyword in ("StructureSetROISequence", "ROIContourSequence"):
        if keyword not in ds:
            raise ValueError(f"no {keyword}, which every RTSTRUCT has")
    roi_names = {int(item.ROINumber): str(item.get("ROIName", "")) for item in ds.get("StructureSetROISequence", [])}
    contours: dict[int, list[_Contour]] = {}
    for roi_item in ds.get("ROIContourSequence", []):
        found = contours.setdefault(int(roi_item.ReferencedROINumber), [])
        for item in roi_item.get("ContourSequence", []):
            data = np.asarray([float(v) for v in item.get("ContourData", [])], dtype=float)
            if data.size % 3:
                raise ValueError(f"ContourData holds {data.size} numbers, not a multiple of 3")
            if not np.isfinite(data).all():
                raise ValueError("ContourData holds a non-finite number")
            found.append(_Contour(str(item.get("ContourGeometricType", "")).upper(), data.reshape(-1, 3)))
    series: set[str] = set()
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
        for study in frame.get("RTReferencedStudySequence", []):
            for item in study.get("RTReferencedSeriesSequence", []):
                if "SeriesInstanceUID" in item:
                    series.add(str(item.SeriesInstanceUID))
    return _StructureSet(roi_names, contours, series)


def _load_rtstruct(path: Path, where: str, fix: str) -> _StructureSet:
    ds = _read_dicom(path, where, "RTSTRUCT", fix)
    try:
        return _parse_rtstruct(ds)
    except _MALFORMED as exc:
        raise MaskFormatError(
            f"{where}: malformed or truncated RTSTRUCT ({exc}); export the structure set again"
        ) from exc


def rtstruct_roi_names(path: str | Path, *, case_id: str | None = None) -> list[str]:
    """The ROI names of an RTSTRUCT file, in file order (e.g. to check a manifest's roi column)."""
    path = Path(path)
    return list(_load_rtstruct(path, describe_path(path, case_id), "give an RTSTRUCT file").roi_names.values())


def _quoted(names: Sequence[str]) -> str:
    """"ROIs 'a', 'b'" (or "no ROI at all")."""
    return "ROIs " + ", ".join(f"'{n}'" for n in names) if names else "no ROI at all"


def read_rtstruct_mask(
    rtstruct_path: str | Path,
    reference_image: sitk.Image,
    roi: str,
    *,
    case_id: str,
    reference_series_uid: str | None = None,
) -> sitk.Image:
    """Rasterise one ROI of an RTSTRUCT onto ``reference_image``'s grid.

    A voxel is 1 when its centre lies inside an odd number of the ROI's closed planar contours
    on its slice (holes and several islands per slice as DICOM intends).

    Args:
        rtstruct_path: the RTSTRUCT file.
        reference_image: the CT the structure was drawn on (any 3D grid; geometry in mm).
        roi: ROIName of the lesion (exact match).
        case_id: names the case in error messages.
        reference_series_uid: SeriesInstanceUID of the CT series (see
            :func:`series_instance_uid`); when given, the RTSTRUCT must reference it.

    Returns:
        uint8 0/1 mask with ``reference_image``'s size, spacing, origin and direction.

    Raises:
        MaskFormatError: not a readable RTSTRUCT, unknown or duplicated ROI name, no closed
            contour, contours off the slice planes or outside the image, no voxel inside,
            or another series referenced.
    """
    path = Path(rtstruct_path)
    where = describe_path(path, case_id)
    _check_reference_image(reference_image, where)
    structures = _load_rtstruct(path, where, "give the RTSTRUCT exported for this case")
    numbers = [number for number, name in structures.roi_names.items() if name == roi]
    names = list(structures.roi_names.values())
    if not numbers:
        raise MaskFormatError(
            f"{where}: no ROI named '{roi}'; the RTSTRUCT holds {_quoted(names)}: "
            "set the case's roi to one of them"
        )
    if len(numbers) > 1:
        raise MaskFormatError(
            f"{where}: {len(numbers)} ROIs are named '{roi}' (ROI numbers {numbers}); "
            "rename them in the RTSTRUCT so that the lesion's name is unique"
        )
    _check_referenced_series(structures.referenced_series, reference_series_uid, where, "RTSTRUCT")
    contours = structures.contours.get(numbers[0], [])
    if not any(c.points_mm.size for c in contours):
        raise MaskFormatError(f"{where}: ROI '{roi}' has no contour; it is empty in the RTSTRUCT (draw the lesion)")
    other = sorted({c.geometric_type for c in contours} - {"CLOSED_PLANAR"})
    if other:
        raise MaskFormatError(
            f"{where}: ROI '{roi}' has contours of type {', '.join(other)}; only CLOSED_PLANAR contours "
            "outline a volume (export the lesion as a closed structure)"
        )
    array = _rasterise([c.points_mm for c in contours if c.points_mm.size], reference_image, f"{where}: ROI '{roi}'")
    if not array.any():
        raise MaskFormatError(
            f"{where}: ROI '{roi}' encloses no voxel centre of the image (its contours are smaller than a "
            "voxel); draw the lesion on this image's grid"
        )
    mask = sitk.GetImageFromArray(array)
    mask.CopyInformation(reference_image)
    log.debug("case %s: ROI of %d voxels from %d contours in %s", case_id, int(array.sum()), len(contours), path.name)
    return mask


def _rasterise(contours: Sequence[np.ndarray], reference: sitk.Image, what: str) -> np.ndarray:
    """Even-odd fill of planar contours (each (N, 3) LPS mm) on ``reference``; array (k, j, i)."""
    n_i, n_j, n_k = reference.GetSize()
    inverse = np.linalg.inv(grid_affine(reference))
    by_slice: dict[int, list[np.ndarray]] = {}
    outside = 0
    for number, points in enumerate(contours, start=1):
        index = points @ inverse[:3, :3].T + inverse[:3, 3]  # continuous (i, j, k)
        k = int(round(float(np.median(index[:, 2]))))
        spread = float(np.abs(index[:, 2] - k).max())
        if spread > _PLANE_TOL_SLICES:
            raise MaskFormatError(
                f"{what}: contour {number} is not on a slice plane of the image (its points are up to "
                f"{spread:.2f} slices off the nearest plane); the RTSTRUCT was drawn on another grid: "
                "give the image it was drawn on"
            )
        low, high = -0.5 - _EXTENT_TOL_VOXELS, np.array([n_i, n_j]) - 0.5 + _EXTENT_TOL_VOXELS
        if not 0 <= k < n_k or (index[:, :2] < low).any() or (index[:, :2] > high).any():
            outside += 1
            continue
        by_slice.setdefault(k, []).append(index[:, :2])
    if outside:
        verb = "lies" if outside == len(contours) else "extends"
        raise MaskFormatError(
            f"{what} {verb} outside the image ({outside} of {len(contours)} contours reach beyond its "
            f"{n_i}x{n_j}x{n_k} voxels); the RTSTRUCT belongs to another (or an uncropped) image: give that image"
        )
    array = np.zeros((n_k, n_j, n_i), dtype=np.uint8)
    for k, polygons in by_slice.items():
        array[k] = _fill_even_odd(polygons, n_j, n_i)
    slices = sorted(by_slice)
    if len(slices) > 2:
        step = math.gcd(*np.diff(slices).tolist())
        if step > 1:
            log.warning("%s: contours only on every %d-th slice of the image; was it drawn on a coarser grid?", what, step)
    return array


def _fill_even_odd(polygons: Sequence[np.ndarray], rows: int, cols: int) -> np.ndarray:
    """Pixels (rows, cols) whose centre (j, i) is inside an odd number of the closed polygons.

    Scan-line rule: along each row ``j`` every edge crossing the row at ``x`` toggles all
    pixels with ``i > x``; an edge from ``j0`` to ``j1`` crosses rows ``j0 <= j < j1`` (half
    open, so a vertex on a row is counted once).
    """
    starts = np.concatenate([p for p in polygons])  # (i, j) of each edge's first point
    ends = np.concatenate([np.roll(p, -1, axis=0) for p in polygons])
    j_lo = np.minimum(starts[:, 1], ends[:, 1])
    j_hi = np.maximum(starts[:, 1], ends[:, 1])
    first = np.clip(np.ceil(j_lo), 0, rows).astype(np.int64)
    stop = np.clip(np.ceil(j_hi), 0, rows).astype(np.int64)
    counts = np.maximum(stop - first, 0)
    toggles = np.zeros((rows, cols + 1), dtype=np.int64)
    if counts.sum():
        edge = np.repeat(np.arange(len(starts)), counts)
        offset = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        row = first[edge] + offset
        i0, j0 = starts[edge, 0], starts[edge, 1]
        i1, j1 = ends[edge, 0], ends[edge, 1]
        x = i0 + (row - j0) * (i1 - i0) / (j1 - j0)  # j1 != j0: horizontal edges cross no row
        column = np.clip(np.floor(x).astype(np.int64) + 1, 0, cols)
        np.add.at(toggles, (row, column), 1)
    return (np.cumsum(toggles[:, :cols], axis=1) % 2).astype(np.uint8)


def _binary_array(mask: sitk.Image, where: str) -> np.ndarray:
    array = sitk.GetArrayFromImage(mask)
    values = np.unique(array)
    if not np.isin(values, (0, 1)).all():
        raise DicomWriteError(
            f"{where}: the mask holds values {values[:6].tolist()}; expected a binary 0/1 mask "
            "(bonemet.data.io.read_mask(path, label) makes one from a label map)"
        )
    if not values.max(initial=0):
        raise DicomWriteError(f"{where}: the mask is empty; there is no lesion to write")
    return array.astype(np.uint8)


def _writer_inputs(mask: sitk.Image, reference_series_dir: Path, where: str, algorithm_type: str,
                   grid_tolerance_mm: float) -> tuple[list[Dataset], np.ndarray]:
    """What both writers start from: the series' slice headers and the mask as a 0/1 array,
    after checking the algorithm type, the mask's grid and its values."""
    if algorithm_type not in ("AUTOMATIC", "MANUAL"):
        raise DicomWriteError(f"{where}: algorithm_type must be 'AUTOMATIC' or 'MANUAL', found {algorithm_type!r}")
    headers = _series_for_mask(mask, reference_series_dir, where, grid_tolerance_mm)
    return headers, _binary_array(mask, where)


def _series_for_mask(mask: sitk.Image, reference_series_dir: Path, where: str,
                     grid_tolerance_mm: float) -> list[Dataset]:
    """Headers of the series, one per slice, after checking that ``mask`` is on its grid."""
    if mask.GetDimension() != 3:
        raise DicomWriteError(f"{where}: the mask is {mask.GetDimension()}D; expected 3D")
    series_image = read_image(reference_series_dir)
    ok, reason = same_grid(series_image, mask, tol_mm=grid_tolerance_mm)
    if not ok:
        raise DicomWriteError(
            f"{where}: the mask is not on the grid of the series {reference_series_dir} (mask {reason}); "
            "resample it onto the series (bonemet.data.io.resample_to_reference) first"
        )
    return slice_headers(reference_series_dir, series_image)


def _slice_contours(plane: np.ndarray) -> list[np.ndarray]:
    """Closed polygons (M, 2) in (i, j) voxel units around the 1-voxels of a 2D 0/1 array.

    The 0.5 iso-line of the zero-padded slice: it passes halfway between each inside and
    outside voxel centre, so the even-odd fill of the polygons gives back the same voxels.
    Collinear points are dropped; the closing point is not repeated (DICOM closes contours).
    """
    import contourpy

    padded = np.pad(plane.astype(np.float64), 1)
    generator = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate)
    polygons = []
    for line in generator.lines(0.5):
        ring = np.asarray(line, dtype=float)[:-1] - 1.0  # the last point repeats the first
        before, after = np.roll(ring, 1, axis=0), np.roll(ring, -1, axis=0)
        turn = (ring - before)[:, 0] * (after - ring)[:, 1] - (ring - before)[:, 1] * (after - ring)[:, 0]
        ring = ring[np.abs(turn) > 1e-9]
        if len(ring) >= 3:
            polygons.append(ring)
    return polygons


def _structure_set(first: Dataset, roi_name: str, structure_set_label: str, series_number: int) -> Dataset:
    """A new RTSTRUCT instance in a new series: patient and study copied from the series' slice
    ``first``, on its frame of reference, dated now; no ROI yet."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTStructureSetStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for keyword in _COPIED_FROM_SERIES:
        setattr(ds, keyword, first.get(keyword, ""))
    if not ds.SpecificCharacterSet:
        ds.SpecificCharacterSet = "ISO_IR 192"
    now = datetime.datetime.now()
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = int(series_number)
    ds.SeriesDescription = f"{structure_set_label} {roi_name}"[:64]
    ds.InstanceNumber = 1
    ds.Manufacturer = "bonemet"
    ds.SoftwareVersions = __version__
    ds.OperatorsName = ""
    ds.StructureSetLabel = structure_set_label[:16]
    ds.StructureSetDate = now.strftime("%Y%m%d")
    ds.StructureSetTime = now.strftime("%H%M%S")
    ds.FrameOfReferenceUID = str(first.FrameOfReferenceUID)
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    return ds


def _image_ref(header: Dataset) -> Dataset:
    """A reference to the slice ``header`` describes (its SOP class and instance)."""
    item = Dataset()
    item.ReferencedSOPClassUID = header.SOPClassUID
    item.ReferencedSOPInstanceUID = header.SOPInstanceUID
    return item


def _referenced_frame(headers: Sequence[Dataset]) -> Dataset:
    """The structure set's reference to the series (every slice), its study and its frame of reference."""
    first = headers[0]
    series_ref = Dataset()
    series_ref.SeriesInstanceUID = first.SeriesInstanceUID
    series_ref.ContourImageSequence = [_image_ref(h) for h in headers]
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = _STUDY_SOP_CLASS
    study_ref.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study_ref.RTReferencedSeriesSequence = [series_ref]
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = str(first.FrameOfReferenceUID)
    frame_ref.RTReferencedStudySequence = [study_ref]
    return frame_ref


def _contour_items(array: np.ndarray, affine: np.ndarray, headers: Sequence[Dataset]) -> list[Dataset]:
    """The ContourSequence of a 0/1 ``array`` (z, y, x): each slice's closed planar contours in
    patient coordinates (mm, ``affine``: voxel index to patient), numbered from 1, each
    referencing its slice."""
    contour_items = []
    for k in np.flatnonzero(array.reshape(array.shape[0], -1).any(axis=1)):
        for ring in _slice_contours(array[k]):
            index = np.column_stack([ring, np.full(len(ring), float(k)), np.ones(len(ring))])
            points = (index @ affine.T)[:, :3]
            item = Dataset()
            item.ContourImageSequence = [_image_ref(headers[k])]
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(points)
            item.ContourNumber = len(contour_items) + 1
            item.ContourData = [f"{v:.4f}" for v in points.ravel()]
            contour_items.append(item)
    return contour_items


def write_rtstruct(
    mask: sitk.Image,
    reference_series_dir: str | Path,
    out_path: str | Path,
    roi_name: str,
    *,
    algorithm_type: AlgorithmType,
    grid_tolerance_mm: float,
    algorithm_name: str = "bonemet MISSU",
    color: tuple[int, int, int] = (255, 0, 0),
    structure_set_label: str = "bonemet",
    series_number: int = 301,
) -> Path:
    """Write a 0/1 mask as an RTSTRUCT with one ROI over the DICOM series it was made on.

    Each slice's lesion becomes closed planar contours (mm, patient coordinates) along the
    0.5 iso-line between voxel centres; each contour references its slice's SOP instance and
    the structure set references the series, its study and frame of reference. Patient and
    study attributes are copied from the series so that viewers file the RTSTRUCT with it.

    Args:
        mask: uint8 0/1 on the series' grid (as :func:`bonemet.data.io.read_image` reads it).
        reference_series_dir: folder of the CT series.
        out_path: the RTSTRUCT file to write (atomically).
        roi_name: ROIName of the structure.
        algorithm_type: ROIGenerationAlgorithm, "AUTOMATIC" (a model's mask) or "MANUAL".
        grid_tolerance_mm: how far (mm) the mask's grid may differ from the series'
            (``validate.grid_tolerance_mm``).
        algorithm_name: ROIGenerationDescription when ``algorithm_type`` is "AUTOMATIC".
        color: ROIDisplayColor, RGB 0-255.
        structure_set_label: StructureSetLabel.
        series_number: SeriesNumber of the new RTSTRUCT series.

    Raises:
        DicomWriteError: mask not binary, empty, or not on the series' grid; bad algorithm type.
        bonemet.data.io.ImageReadError: the series folder cannot be read.
    """
    reference_series_dir, out_path = Path(reference_series_dir), Path(out_path)
    where = str(out_path)
    headers, array = _writer_inputs(mask, reference_series_dir, where, algorithm_type, grid_tolerance_mm)
    first = headers[0]
    frame_uid = str(first.FrameOfReferenceUID)

    ds = _structure_set(first, roi_name, structure_set_label, series_number)

    ds.ReferencedFrameOfReferenceSequence = [_referenced_frame(headers)]

    roi = Dataset()
    roi.ROINumber = 1
    roi.ReferencedFrameOfReferenceUID = frame_uid
    roi.ROIName = roi_name
    roi.ROIGenerationAlgorithm = algorithm_type
    if algorithm_type == "AUTOMATIC":
        roi.ROIGenerationDescription = algorithm_name
    ds.StructureSetROISequence = [roi]

    contour_items = _contour_items(array, grid_affine(mask), headers)
    roi_contour = Dataset()
    roi_contour.ROIDisplayColor = [int(c) for c in color]
    roi_contour.ReferencedROINumber = 1
    roi_contour.ContourSequence = contour_items
    ds.ROIContourSequence = [roi_contour]

    observation = Dataset()
    observation.ObservationNumber = 1
    observation.ReferencedROINumber = 1
    observation.RTROIInterpretedType = ""
    observation.ROIInterpreter = ""
    ds.RTROIObservationsSequence = [observation]

    with atomic_path(out_path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    log.info("wrote RTSTRUCT ROI '%s' (%d contours) to %s", roi_name, len(contour_items), out_path)
    return out_path


# ---------------------------------------------------------------------------------------------
# SEG


def _load_seg(path: Path, where: str, fix: str):
    """The file as a highdicom Segmentation (highdicom imported here: it is slow to import)."""
    import highdicom as hd

    ds = _read_dicom(path, where, "SEG", fix)
    try:
        return hd.seg.Segmentation.from_dataset(ds, copy=False)
    except _MALFORMED as exc:
        raise MaskFormatError(f"{where}: malformed DICOM SEG ({exc}); export the segmentation again") from exc


def _segment_labels(seg, where: str) -> dict[int, str]:
    try:
        return {int(n): str(seg.get_segment_description(n).segment_label) for n in seg.segment_numbers}
    except _MALFORMED as exc:
        raise MaskFormatError(f"{where}: malformed segment descriptions ({exc}); export the segmentation again") from exc


def seg_segment_labels(path: str | Path, *, case_id: str | None = None) -> dict[int, str]:
    """Segment number -> SegmentLabel of a DICOM SEG file (e.g. to check a manifest's segment)."""
    path = Path(path)
    where = describe_path(path, case_id)
    return _segment_labels(_load_seg(path, where, "give a DICOM SEG file"), where)


def _segments_text(labels: dict[int, str]) -> str:
    return ", ".join(f"{n} '{label}'" for n, label in labels.items()) or "no segment at all"


def _resolve_segment(seg_segment: int | str, labels: dict[int, str], where: str) -> int:
    if isinstance(seg_segment, bool) or not isinstance(seg_segment, int | str):
        raise MaskFormatError(f"{where}: segment must be a segment number or label, found {seg_segment!r}")
    if isinstance(seg_segment, int):
        if seg_segment in labels:
            return seg_segment
        raise MaskFormatError(
            f"{where}: no segment number {seg_segment}; the SEG holds segments {_segments_text(labels)}: "
            "set the case's segment to one of them"
        )
    numbers = [n for n, label in labels.items() if label == seg_segment]
    if not numbers:
        raise MaskFormatError(
            f"{where}: no segment labelled '{seg_segment}'; the SEG holds segments {_segments_text(labels)}: "
            "set the case's segment to one of them"
        )
    if len(numbers) > 1:
        raise MaskFormatError(
            f"{where}: {len(numbers)} segments are labelled '{seg_segment}' (numbers {numbers}); "
            "give the segment number instead"
        )
    return numbers[0]


@dataclass(frozen=True)
class _Frame:
    index: int  # 0-based frame index in the file
    seg_segment: int | None  # ReferencedSegmentNumber (None for a LABELMAP frame, which holds all)
    position: np.ndarray  # ImagePositionPatient, mm
    orientation: np.ndarray  # ImageOrientationPatient (6)
    spacing: np.ndarray  # PixelSpacing (row, column), mm


def _parse_seg_frames(seg) -> list[_Frame]:
    """Per-frame geometry and segment of a SEG (per-frame groups, else the shared group)."""
    shared = seg.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in seg else Dataset()
    per_frame = seg.get("PerFrameFunctionalGroupsSequence", [])
    frames = []
    for index in range(int(seg.get("NumberOfFrames", 1))):
        groups = per_frame[index] if index < len(per_frame) else Dataset()

        def group(keyword: str, groups: Dataset = groups) -> Dataset:
            if keyword in groups:
                return groups[keyword].value[0]
            return shared[keyword].value[0]

        seg_number = None
        if "SegmentIdentificationSequence" in groups or "SegmentIdentificationSequence" in shared:
            seg_number = int(group("SegmentIdentificationSequence").ReferencedSegmentNumber)
        frames.append(
            _Frame(
                index=index,
                seg_segment=seg_number,
                position=np.asarray([float(v) for v in group("PlanePositionSequence").ImagePositionPatient]),
                orientation=np.asarray([float(v) for v in group("PlaneOrientationSequence").ImageOrientationPatient]),
                spacing=np.asarray([float(v) for v in group("PixelMeasuresSequence").PixelSpacing]),
            )
        )
    return frames


def _seg_referenced_series(seg) -> set[str]:
    return {str(item.SeriesInstanceUID) for item in seg.get("ReferencedSeriesSequence", []) if "SeriesInstanceUID" in item}


def _frame_slice(frame: _Frame, reference_image: sitk.Image, inverse: np.ndarray, *, where: str,
                 grid_tolerance_mm: float) -> int:
    """The slice of ``reference_image`` a SEG frame lies on (``inverse``: the inverse of its
    :func:`grid_affine`); a frame with another orientation or pixel spacing, off a slice position
    (by more than ``grid_tolerance_mm``) or outside the image is a :class:`MaskFormatError`."""
    n_k = reference_image.GetSize()[2]
    direction = np.asarray(reference_image.GetDirection(), dtype=float).reshape(3, 3)
    expected_orientation = np.concatenate([direction[:, 0], direction[:, 1]])
    sx, sy, _ = reference_image.GetSpacing()
    problem = ""
    k = int(round(float((inverse[:3, :3] @ frame.position + inverse[:3, 3])[2])))
    expected_position = np.asarray(reference_image.TransformContinuousIndexToPhysicalPoint((0.0, 0.0, float(k))))
    if not np.allclose(frame.orientation, expected_orientation, atol=_DIRECTION_TOL):
        problem = "frame orientation differs from the image's direction cosines"
    elif not np.allclose(frame.spacing, (sy, sx), atol=grid_tolerance_mm):
        problem = f"pixel spacing {tuple(frame.spacing.round(4))} mm != image spacing {(round(sy, 4), round(sx, 4))} mm"
    elif np.abs(frame.position - expected_position).max() > grid_tolerance_mm:
        problem = (f"frame {frame.index + 1} at {tuple(frame.position.round(3))} mm is not on a slice position "
                   "of the image (slice spacing or origin differs)")
    elif not 0 <= k < n_k:
        problem = f"frame {frame.index + 1} lies on slice {k}, outside the image's {n_k} slices"
    if problem:
        raise MaskFormatError(f"{where}: the SEG is not on the image's grid: {problem}; give the SEG made on this image's series")
    return k


def read_seg_mask(
    seg_path: str | Path,
    reference_image: sitk.Image,
    seg_segment: int | str,
    *,
    case_id: str,
    grid_tolerance_mm: float,
    reference_series_uid: str | None = None,
) -> sitk.Image:
    """One segment of a DICOM SEG as a 0/1 mask on ``reference_image``'s grid.

    Each frame of the segment is placed on the slice of the reference grid at its
    ImagePositionPatient; slices without a frame are empty (SEG files omit empty frames).
    BINARY and LABELMAP segmentations are read; a FRACTIONAL one holds probabilities and is
    refused (threshold it into a BINARY SEG first).

    Args:
        seg_path: the SEG file.
        reference_image: the CT the segmentation was made on.
        seg_segment: segment number (int) or SegmentLabel (str, exact match).
        case_id: names the case in error messages.
        grid_tolerance_mm: how far (mm) a frame's position and pixel spacing may be from the
            reference grid's (params ``validate.grid_tolerance_mm``).
        reference_series_uid: SeriesInstanceUID of the CT series; when given, the SEG must
            reference it.

    Raises:
        MaskFormatError: not a readable SEG, unknown segment, FRACTIONAL type, frames off the
            reference grid (spacing, orientation, position, size), another series referenced,
            or an empty segment.
    """
    path = Path(seg_path)
    where = describe_path(path, case_id)
    _check_reference_image(reference_image, where)
    fix = "give the DICOM SEG exported for this case"
    seg = _load_seg(path, where, fix)
    labels = _segment_labels(seg, where)
    number = _resolve_segment(seg_segment, labels, where)
    seg_type = str(seg.get("SegmentationType", "")).upper()
    if seg_type not in ("BINARY", "LABELMAP"):
        raise MaskFormatError(
            f"{where}: a {seg_type or 'untyped'} segmentation; only BINARY and LABELMAP SEGs are masks "
            "(threshold a FRACTIONAL one into a BINARY SEG first)"
        )
    _check_referenced_series(_seg_referenced_series(seg), reference_series_uid, where, "SEG")
    try:
        frames = [f for f in _parse_seg_frames(seg) if f.seg_segment in (None, number)]
    except _MALFORMED as exc:
        raise MaskFormatError(f"{where}: malformed frame geometry in the SEG ({exc}); export it again") from exc

    n_i, n_j, n_k = reference_image.GetSize()
    rows, cols = int(seg.Rows), int(seg.Columns)
    if (rows, cols) != (n_j, n_i):
        raise MaskFormatError(
            f"{where}: SEG frames are {cols}x{rows} pixels, the image's slices {n_i}x{n_j}; the SEG is on "
            "another grid: give the SEG made on this image's series"
        )
    inverse = np.linalg.inv(grid_affine(reference_image))
    array = np.zeros((n_k, n_j, n_i), dtype=np.uint8)
    for frame in frames:
        k = _frame_slice(frame, reference_image, inverse, where=where, grid_tolerance_mm=grid_tolerance_mm)
        try:
            pixels = np.asarray(seg.get_stored_frame(frame.index, as_index=True))
        except (ValueError, RuntimeError, NotImplementedError, KeyError, TypeError, IndexError) as exc:
            raise MaskFormatError(
                f"{where}: frame {frame.index + 1} cannot be decoded ({exc}); export the SEG uncompressed"
            ) from exc
        hit = pixels == number if frame.seg_segment is None else pixels > 0
        array[k] |= hit.astype(np.uint8)
    if not array.any():
        raise MaskFormatError(
            f"{where}: segment {number} '{labels[number]}' is empty (no voxel); segment the lesion in this file"
        )
    mask = sitk.GetImageFromArray(array)
    mask.CopyInformation(reference_image)
    log.debug("case %s: segment %d of %d voxels from %s", case_id, number, int(array.sum()), path.name)
    return mask


def write_seg(
    mask: sitk.Image,
    reference_series_dir: str | Path,
    out_path: str | Path,
    *,
    algorithm_type: AlgorithmType,
    grid_tolerance_mm: float,
    segment_label: str = "lesion",
    algorithm_name: str = "bonemet MISSU",
    series_number: int = 300,
    series_description: str = "bonemet lesion segmentation",
) -> Path:
    """Write a 0/1 mask as a BINARY DICOM SEG (one segment) over the series it was made on.

    Made with highdicom: frames reference their source slices, patient and study attributes
    come from the series, and empty frames are omitted, so 3D Slicer or a PACS viewer shows
    the segment over the original series. The segment is coded as a lesion
    (SCT 49755003 "Morphologically Abnormal Structure" / SCT 52988006 "Lesion").

    Args:
        mask: uint8 0/1 on the series' grid (as :func:`bonemet.data.io.read_image` reads it).
        reference_series_dir: folder of the CT series.
        out_path: the SEG file to write (atomically).
        algorithm_type: "AUTOMATIC" (a model's mask, identified as ``algorithm_name``) or "MANUAL".
        grid_tolerance_mm: how far (mm) the mask's grid may differ from the series'
            (``validate.grid_tolerance_mm``).
        segment_label: SegmentLabel of segment 1.
        algorithm_name: AlgorithmName for an AUTOMATIC segment (version: bonemet's).
        series_number: SeriesNumber of the SEG series.
        series_description: SeriesDescription of the SEG series.

    Raises:
        DicomWriteError: mask not binary, empty, or not on the series' grid; bad algorithm type.
        bonemet.data.io.ImageReadError: the series folder cannot be read.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    reference_series_dir, out_path = Path(reference_series_dir), Path(out_path)
    where = str(out_path)
    headers, array = _writer_inputs(mask, reference_series_dir, where, algorithm_type, grid_tolerance_mm)
    algorithm = None
    if algorithm_type == "AUTOMATIC":
        algorithm = hd.AlgorithmIdentificationSequence(
            name=algorithm_name, family=codes.DCM.ArtificialIntelligence, version=__version__
        )
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=segment_label,
        segmented_property_category=hd.sr.CodedConcept(*_LESION_CATEGORY),
        segmented_property_type=hd.sr.CodedConcept(*_LESION_TYPE),
        algorithm_type=algorithm_type,
        algorithm_identification=algorithm,
    )
    seg = hd.seg.Segmentation(
        source_images=headers,
        pixel_array=array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=generate_uid(),
        series_number=int(series_number),
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="bonemet",
        manufacturer_model_name="bonemet",
        software_versions=__version__,
        device_serial_number="0",
        series_description=series_description,
    )
    with atomic_path(out_path) as tmp:
        seg.save_as(tmp)
    log.info("wrote DICOM SEG '%s' (%d frames) to %s", segment_label, int(seg.NumberOfFrames), out_path)
    return out_path


# ---------------------------------------------------------------------------------------------
# One reader for the rest of the code base


MaskFormat = Literal["rtstruct", "seg", "labelmap"]


def mask_format(path: str | Path, *, case_id: str | None = None) -> MaskFormat:
    """How :func:`read_lesion_mask` reads ``path``: a DICOM RTSTRUCT, a DICOM SEG, or a label map
    (anything else: NIfTI, NRRD, MetaImage, a DICOM series folder, a missing file). A DICOM file
    of another modality is a ``MaskFormatError``; only its header is read."""
    path = Path(path)
    if not path.is_file() or path.name.lower().endswith(IMAGE_SUFFIXES):
        return "labelmap"
    modality = dicom_modality(path, case_id=case_id)
    if modality == "RTSTRUCT":
        return "rtstruct"
    if modality in _SEG_MODALITIES:
        return "seg"
    if modality is not None:
        raise MaskFormatError(
            f"{describe_path(path, case_id)}: a DICOM {modality} file, not a mask; expected an RTSTRUCT, "
            "a DICOM SEG or a label map"
        )
    return "labelmap"


def read_lesion_mask(
    path: str | Path,
    reference_image: sitk.Image,
    *,
    label: int,
    roi: str | None,
    seg_segment: int | str | None,
    case_id: str,
    grid_tolerance_mm: float,
    reference_series_uid: str | None = None,
    reference_image_path: str | Path | None = None,
) -> sitk.Image:
    """The lesion mask of a case, from an RTSTRUCT, a DICOM SEG or a label map.

    The format comes from the file (:func:`mask_format`): a DICOM file of Modality RTSTRUCT
    (needs ``roi``) or SEG (needs ``segment``); anything else (NIfTI, NRRD, MetaImage, a DICOM
    series folder) is a label map whose voxels equal to ``label`` are the lesion, and must be on
    the reference grid within ``grid_tolerance_mm`` (its geometry is then set to the reference's
    exactly). Every reader of a manual or annotator mask in bonemet goes through here.

    Args:
        path: the mask file (or folder, for a label map stored as a DICOM series).
        reference_image: the case's CT (only its geometry is used).
        label: lesion value of a label map (params ``data.mask_label``).
        roi: ROIName of the lesion in an RTSTRUCT (the manifest's roi column); else unused.
        seg_segment: segment number or label in a SEG; else unused.
        case_id: names the case in error messages.
        grid_tolerance_mm: mm a label map's or SEG's grid may differ from the CT's.
        reference_series_uid: the CT series' SeriesInstanceUID when the CT is a DICOM series
            (:func:`series_instance_uid`); a DICOM mask must then reference it.
        reference_image_path: the CT's file or DICOM folder: when it is a DICOM series folder,
            ``reference_series_uid`` is not given and the mask is a DICOM file, the series UID is
            read from the folder's headers (so the mask must reference that series).

    Returns:
        uint8 0/1 mask with ``reference_image``'s geometry.

    Raises:
        MaskFormatError: see :func:`read_rtstruct_mask`, :func:`read_seg_mask`; a DICOM file
            of another modality; a label map off the reference grid.
        bonemet.data.io.ImageReadError: a label map that cannot be read.
    """
    path = Path(path)
    where = describe_path(path, case_id)
    kind = mask_format(path, case_id=case_id)
    if kind != "labelmap" and reference_series_uid is None and reference_image_path is not None \
            and Path(reference_image_path).is_dir():
        reference_series_uid = series_instance_uid(reference_image_path, case_id=case_id)
    if kind == "rtstruct":
        if not roi:
            names = rtstruct_roi_names(path, case_id=case_id)
            raise MaskFormatError(
                f"{where}: an RTSTRUCT needs the lesion's ROI name; it holds {_quoted(names)}: "
                "set the case's roi (manifest column roi, or params data.roi) to one of them"
            )
        return read_rtstruct_mask(path, reference_image, roi, case_id=case_id, reference_series_uid=reference_series_uid)
    if kind == "seg":
        if seg_segment is None or seg_segment == "":
            labels = seg_segment_labels(path, case_id=case_id)
            raise MaskFormatError(
                f"{where}: a DICOM SEG needs the lesion's segment; it holds segments {_segments_text(labels)}: "
                "set the case's segment (manifest column segment, or params data.segment) to one of them"
            )
        return read_seg_mask(
            path, reference_image, seg_segment, case_id=case_id, grid_tolerance_mm=grid_tolerance_mm,
            reference_series_uid=reference_series_uid,
        )
    mask = read_mask(path, label=label, case_id=case_id)
    ok, reason = same_grid(reference_image, mask, tol_mm=grid_tolerance_mm)
    if not ok:
        raise MaskFormatError(
            f"{where}: the label map is not on the image's grid (mask {reason}); give a mask made on this image"
        )
    mask.CopyInformation(reference_image)
    return mask
