"""DICOM CT series: write an HU image as a series, and read a series' headers without pixels.

Geometry follows ITK's physical space (mm, LPS), which is DICOM's patient coordinate system:
for an image with origin ``o``, spacing ``(sx, sy, sz)`` and direction matrix ``D`` (columns
are the i, j, k axes), slice ``k`` has ImagePositionPatient ``o + k * sz * D[:, 2]``,
ImageOrientationPatient ``D[:, 0], D[:, 1]`` (row then column direction) and PixelSpacing
``[sy, sx]`` (row spacing first, as the standard orders it). :func:`bonemet.data.io.read_image`
reads such a series back on the same grid with the same HU values.

Headers are read with pydicom and ``stop_before_pixels``: finding a series' SeriesInstanceUID
or the SOP instance of each slice (which RTSTRUCT and SEG files must reference) never decodes
pixel data. Patient-identifying tags are written only where the caller passes them, and
never logged.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from bonemet import __version__
from bonemet.data.io import ImageReadError, describe_path
from bonemet.utils import atomic_path

log = logging.getLogger(__name__)

__all__ = [
    "IDENTIFYING_KEYWORDS",
    "DicomWriteError",
    "dicom_truncation",
    "grid_affine",
    "series_instance_uid",
    "slice_headers",
    "write_dicom_series",
]

#: Patient, study and site attributes a caller may set through ``patient=``. Without a value
#: each gets the neutral placeholder below (type 2 attributes stay present but empty).
IDENTIFYING_KEYWORDS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "OtherPatientIDs",
    "InstitutionName",
    "InstitutionAddress",
    "StationName",
    "AccessionNumber",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "StudyDescription",
    "SeriesDate",
    "SeriesTime",
    "AcquisitionDate",
    "ContentDate",
)
_PLACEHOLDERS = {"PatientName": "ANONYMOUS^", "PatientID": "ANONYMOUS"}
# Present in every CT file written here (type 2: may be empty, must exist).
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "StudyID", "AccessionNumber", "ReferringPhysicianName")
# Geometry checks of a series against a grid: both come from the same header strings, so
# anything above rounding is a real mismatch.
_POSITION_TOL_MM = 1e-3
_HU_OFFSET = 1024  # stored value = HU + 1024 with RescaleIntercept -1024, the usual CT encoding


class DicomWriteError(ValueError):
    """An image or mask cannot be written as DICOM; the message says why and what to pass."""


def grid_affine(image: sitk.Image) -> np.ndarray:
    """The 4x4 matrix mapping a voxel index ``(i, j, k, 1)`` of ``image`` to LPS mm."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=float)
    affine[:3, 3] = image.GetOrigin()
    return affine


def _ds(value: float) -> str:
    """A float as a DICOM decimal string (at most 16 characters, as precise as fits)."""
    return format_number_as_ds(float(value))


def write_dicom_series(
    image_hu: sitk.Image,
    out_dir: str | Path,
    *,
    patient: Mapping[str, str] | None = None,
    series_description: str = "CT",
    series_number: int = 1,
    overwrite: bool = False,
) -> list[Path]:
    """Write a 3D CT in HU as a DICOM CT series, one file per slice along the k axis.

    Stored values are ``HU + 1024`` (signed 16 bit) with RescaleSlope 1 and RescaleIntercept
    -1024 (intercept 0 when the HU range needs it), so a reader that applies the rescale gets
    the input HU back exactly. Study, series, frame-of-reference and SOP instance UIDs are new.
    The folder is written atomically (a temporary sibling renamed into place).

    Args:
        image_hu: 3D single-channel image of integer HU in the int16 range; any orthonormal,
            right-handed direction (axial, flipped in-plane, oblique).
        out_dir: folder for the series; ``CT_0000.dcm``... in slice order.
        patient: DICOM keyword -> value for identifying attributes (see
            :data:`IDENTIFYING_KEYWORDS`); the rest get neutral placeholders.
        series_description: SeriesDescription of the new series.
        series_number: SeriesNumber of the new series.
        overwrite: replace an existing non-empty ``out_dir`` (its whole content).

    Returns:
        The written files, slice 0 first.

    Raises:
        DicomWriteError: not 3D single-channel, non-integer or out-of-range HU, a direction a
            DICOM series cannot hold, unknown ``patient`` keys, or ``out_dir`` not empty.
    """
    out_dir = Path(out_dir)
    if image_hu.GetDimension() != 3 or image_hu.GetNumberOfComponentsPerPixel() != 1:
        raise DicomWriteError(
            f"{out_dir}: expected a 3D single-channel CT, found {image_hu.GetDimension()}D with "
            f"{image_hu.GetNumberOfComponentsPerPixel()} component(s)"
        )
    patient = dict(patient or {})
    unknown = sorted(set(patient) - set(IDENTIFYING_KEYWORDS))
    if unknown:
        raise DicomWriteError(
            f"{out_dir}: patient keys {', '.join(unknown)} are not settable; use DICOM keywords among "
            f"{', '.join(IDENTIFYING_KEYWORDS)}"
        )
    direction = np.asarray(image_hu.GetDirection(), dtype=float).reshape(3, 3)
    _check_direction(direction, out_dir)
    stored, offset = _stored_values(image_hu, out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise DicomWriteError(f"{out_dir}: exists and is not an empty folder; pass overwrite=True to replace it")

    spacing = image_hu.GetSpacing()
    affine = grid_affine(image_hu)
    uids = {"StudyInstanceUID": generate_uid(), "SeriesInstanceUID": generate_uid(),
            "FrameOfReferenceUID": generate_uid()}
    normal = direction[:, 2]
    names = [f"CT_{k:04d}.dcm" for k in range(stored.shape[0])]
    with atomic_path(out_dir, is_dir=True) as tmp:
        for k, name in enumerate(names):
            position = affine[:3, :3] @ np.array([0.0, 0.0, k]) + affine[:3, 3]
            ds = _ct_slice(stored[k], uids, patient, series_description, series_number)
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = [_ds(v) for v in position]
            ds.ImageOrientationPatient = [_ds(v) for v in (*direction[:, 0], *direction[:, 1])]
            ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]
            ds.SliceThickness = _ds(spacing[2])
            ds.SpacingBetweenSlices = _ds(spacing[2])
            ds.SliceLocation = _ds(float(position @ normal))
            ds.RescaleIntercept = str(-offset)
            ds.save_as(tmp / name, enforce_file_format=True)
    log.info("wrote a DICOM CT series of %d slices to %s", len(names), out_dir)
    return [out_dir / name for name in names]


def _stored_values(image_hu: sitk.Image, out_dir: Path) -> tuple[np.ndarray, int]:
    """The slices' stored values (int16, (k, j, i)): HU plus the offset, ``_HU_OFFSET`` or 0 when
    the HU range needs it; integer HU in the int16 range, else a :class:`DicomWriteError`."""
    hu = sitk.GetArrayFromImage(image_hu)  # (k, j, i)
    if not np.issubdtype(hu.dtype, np.integer):
        if not np.all(np.isfinite(hu)) or not np.array_equal(hu, np.rint(hu)):
            raise DicomWriteError(f"{out_dir}: HU values must be integers (cast the image to int16 first)")
    lo, hi = int(hu.min()), int(hu.max())
    if lo < -32768 or hi > 32767:
        raise DicomWriteError(f"{out_dir}: HU range [{lo}, {hi}] does not fit 16 bits; expected int16 HU")
    offset = _HU_OFFSET if hi + _HU_OFFSET <= 32767 else 0
    return (hu.astype(np.int32) + offset).astype(np.int16), offset


def _check_direction(direction: np.ndarray, out_dir: Path) -> None:
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-6):
        raise DicomWriteError(f"{out_dir}: the image's direction cosines are not orthonormal; resample it first")
    if np.linalg.det(direction) < 0:
        # A series is sorted along row x column by every reader: a left-handed grid would come
        # back with its slices reversed (another origin and direction).
        raise DicomWriteError(
            f"{out_dir}: the image's direction is left-handed (slice axis opposite to row x column), "
            "which a DICOM series cannot hold; flip the image along k (sitk.Flip(image, (False, False, True))) first"
        )


def _ct_slice(pixels: np.ndarray, uids: Mapping[str, str], patient: Mapping[str, str],
              series_description: str, series_number: int) -> Dataset:
    """One CT Image Storage dataset with everything but the per-slice geometry."""
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    for keyword, uid in uids.items():
        setattr(ds, keyword, uid)
    for keyword in _TYPE2:
        setattr(ds, keyword, _PLACEHOLDERS.get(keyword, ""))
    for keyword, value in patient.items():
        setattr(ds, keyword, value)
    ds.Modality = "CT"
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.SeriesNumber = int(series_number)
    ds.SeriesDescription = series_description
    ds.Manufacturer = "bonemet"
    ds.SoftwareVersions = __version__
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = ""
    ds.Laterality = ""
    ds.KVP = ""
    ds.AcquisitionNumber = 1
    ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    return ds


_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_DEFLATED = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95")


class _Truncated(Exception):
    """Internal: the byte stream ends inside an element or an open sequence."""


def dicom_truncation(data: bytes) -> str | None:
    """Why a DICOM file's bytes are incomplete, or None when its element structure is whole.

    pydicom reads a file cut short without complaint, stopping at the last whole element or
    sequence item (a structure set cut after its third contour reads as three contours), so
    readers of user files check first that every element fits in the file and every
    undefined-length sequence and item is closed by its delimiter. Deflated transfer syntaxes
    are not checked (None).
    """
    if len(data) < 132 or data[128:132] != b"DICM":
        return "no DICOM preamble"
    try:
        pos = 132
        while pos + 4 <= len(data) and struct.unpack_from("<H", data, pos)[0] == 0x0002:
            pos = _skip_element(data, pos, explicit=True, little=True)
        syntax = _file_meta_syntax(data[132:pos])
        if syntax in _DEFLATED:
            return None
        explicit, little = syntax != "1.2.840.10008.1.2", syntax != "1.2.840.10008.1.2.2"
        while pos < len(data):
            pos = _skip_element(data, pos, explicit=explicit, little=little)
    except _Truncated as exc:
        return str(exc)
    return None


def _file_meta_syntax(meta: bytes) -> str:
    """TransferSyntaxUID (0002,0010) from the raw file meta group (explicit VR little endian)."""
    pos = 0
    while pos + 8 <= len(meta):
        group, element = struct.unpack_from("<HH", meta, pos)
        length = struct.unpack_from("<H", meta, pos + 6)[0]
        header = 8
        if meta[pos + 4:pos + 6] in _LONG_VRS:
            length, header = struct.unpack_from("<I", meta, pos + 8)[0], 12
        if (group, element) == (0x0002, 0x0010):
            return meta[pos + header:pos + header + length].decode("ascii", "replace").strip("\x00 ")
        pos += header + length
    return "1.2.840.10008.1.2.1"


def _skip_element(data: bytes, pos: int, *, explicit: bool, little: bool) -> int:
    """Position after the element at ``pos`` (descending into undefined-length values)."""
    order = "<" if little else ">"
    if pos + 8 > len(data):
        raise _Truncated(f"the file ends inside an element header at byte {pos}")
    group, element = struct.unpack_from(order + "HH", data, pos)
    tag = (group << 16) | element
    if tag in (_ITEM, _ITEM_END, _SEQUENCE_END):
        raise _Truncated(f"an item or delimiter outside a sequence at byte {pos}")
    vr = data[pos + 4:pos + 6]
    if explicit and vr in _LONG_VRS:
        if pos + 12 > len(data):
            raise _Truncated(f"the file ends inside an element header at byte {pos}")
        length, header = struct.unpack_from(order + "I", data, pos + 8)[0], 12
    elif explicit:
        length, header = struct.unpack_from(order + "H", data, pos + 6)[0], 8
    else:
        length, header = struct.unpack_from(order + "I", data, pos + 4)[0], 8
    pos += header
    if length == _UNDEFINED:
        # Items of an undefined-length UN value are implicit VR little endian (PS3.5 6.2.2).
        implicit_inside = explicit and vr == b"UN"
        return _skip_items(data, pos, explicit=explicit and not implicit_inside, little=little or implicit_inside)
    if pos + length > len(data):
        raise _Truncated(f"the file ends inside element ({group:04X},{element:04X}): {len(data) - pos} of {length} bytes")
    return pos + length


def _skip_items(data: bytes, pos: int, *, explicit: bool, little: bool) -> int:
    """Position after the sequence delimiter closing the items that start at ``pos``."""
    order = "<" if little else ">"
    while True:
        if pos + 8 > len(data):
            raise _Truncated("the file ends inside a sequence (no sequence delimiter)")
        group, element, length = struct.unpack_from(order + "HHI", data, pos)
        tag = (group << 16) | element
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise _Truncated(f"expected a sequence item at byte {pos - 8}, found ({group:04X},{element:04X})")
        if length != _UNDEFINED:
            if pos + length > len(data):
                raise _Truncated(f"the file ends inside a sequence item: {len(data) - pos} of {length} bytes")
            pos += length
            continue
        while True:
            if pos + 8 > len(data):
                raise _Truncated("the file ends inside a sequence item (no item delimiter)")
            group, element = struct.unpack_from(order + "HH", data, pos)
            if (group << 16) | element == _ITEM_END:
                pos += 8
                break
            pos = _skip_element(data, pos, explicit=explicit, little=little)


def _read_header(path: Path, where: str) -> Dataset | None:
    """A file's header without pixel data; None for a file that is not DICOM."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, EOFError):
        return None
    except (OSError, ValueError, KeyError, TypeError, struct.error, BytesLengthException) as exc:
        raise ImageReadError(f"{where}: {path.name} is a damaged DICOM file ({exc})") from exc


def _series_headers(folder: Path, where: str) -> list[Dataset]:
    """Headers of the one image series in ``folder`` (files that are not DICOM are skipped)."""
    if not folder.is_dir():
        raise ImageReadError(f"{where}: not a folder holding a DICOM series")
    by_series: dict[str, list[Dataset]] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        ds = _read_header(path, where)
        if ds is None or "ImagePositionPatient" not in ds:
            continue  # not DICOM, or not an image slice (e.g. a DICOMDIR)
        by_series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(ds)
    if not by_series:
        raise ImageReadError(f"{where}: folder holds no DICOM image slices")
    if len(by_series) > 1:
        raise ImageReadError(
            f"{where}: folder holds {len(by_series)} DICOM series; put each series in its own folder"
        )
    (uid, headers), = by_series.items()
    if not uid:
        raise ImageReadError(f"{where}: the DICOM slices have no SeriesInstanceUID")
    return headers


def series_instance_uid(folder: str | Path, *, case_id: str | None = None) -> str:
    """The SeriesInstanceUID of the one DICOM image series in ``folder``, read from headers only.

    Used to check that an RTSTRUCT or SEG was drawn on this series.

    Raises:
        ImageReadError: no folder, no DICOM image slices, several series, or a damaged file.
    """
    folder = Path(folder)
    headers = _series_headers(folder, describe_path(folder, case_id))
    return str(headers[0].SeriesInstanceUID)


def slice_headers(folder: str | Path, grid: sitk.Image, *, case_id: str | None = None) -> list[Dataset]:
    """Headers of the series in ``folder``, one per slice of ``grid``, ordered by slice index k.

    ``grid`` is the series' geometry (e.g. ``read_image(folder)``, or a mask on it). Each file
    is placed by its ImagePositionPatient, which must be the grid's point ``(0, 0, k)``.

    Raises:
        ImageReadError: the files do not make exactly one slice per k of ``grid``.
    """
    folder = Path(folder)
    where = describe_path(folder, case_id)
    headers = _series_headers(folder, where)
    inverse = np.linalg.inv(grid_affine(grid))
    n_slices = grid.GetSize()[2]
    by_k: dict[int, Dataset] = {}
    for ds in headers:
        try:
            position = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=float)
        except (TypeError, ValueError) as exc:
            raise ImageReadError(f"{where}: a slice has an unreadable ImagePositionPatient ({exc})") from exc
        index = inverse[:3, :3] @ position + inverse[:3, 3]
        k = int(round(index[2]))
        expected = grid.TransformContinuousIndexToPhysicalPoint((0.0, 0.0, float(k)))
        if not 0 <= k < n_slices or np.abs(position - expected).max() > _POSITION_TOL_MM or k in by_k:
            raise ImageReadError(
                f"{where}: slice {ds.get('InstanceNumber', '?')} at {tuple(round(v, 3) for v in position)} mm "
                "is not one slice of the series' grid; the folder must hold one complete series"
            )
        by_k[k] = ds
    if len(by_k) != n_slices:
        raise ImageReadError(f"{where}: the series has {len(by_k)} slices, the grid {n_slices}")
    return [by_k[k] for k in range(n_slices)]
