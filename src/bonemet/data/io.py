"""Image I/O behind one reader/writer interface: NIfTI, NRRD and DICOM series.

Images are SimpleITK images in physical space (mm, LPS). DICOM series are read with the
SimpleITK series reader, which applies Rescale Slope/Intercept, so values are Hounsfield
units. No metadata is ever carried over from the input files: patient-identifying DICOM
tags, and whatever a NIfTI/NRRD header holds, never reach logs, tables or outputs.
"""

from __future__ import annotations

import errno
import gzip
import logging
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from bonemet.errors import UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
#: The largest image read (voxels): a 512 x 512 x 4096 CT. A header claiming more is refused
#: before anything is allocated (a corrupt or hostile file must not exhaust the memory).
MAX_VOXELS = 512 * 512 * 4096


class ImageReadError(UserError, ValueError):
    """An image or mask could not be read; the message names the file (and case) and why."""


def describe_path(path: Path, case_id: str | None) -> str:
    return f"case '{case_id}': {path}" if case_id else str(path)


def _strip_metadata(image: sitk.Image) -> sitk.Image:
    """Return the image without any header metadata (keeps pixels and geometry only)."""
    for key in image.GetMetaDataKeys():
        image.EraseMetaData(key)
    return image


def read_image(path: str | Path, case_id: str | None = None, pixel_type: int | None = None) -> sitk.Image:
    """Read a 3D image from a NIfTI/NRRD/MetaImage file or a folder holding one DICOM series.

    Args:
        path: file, or folder of DICOM slices (exactly one series).
        case_id: used only to name the case in error messages.
        pixel_type: optional SimpleITK pixel type to cast to (e.g. ``sitk.sitkFloat32``).

    A 4D image whose fourth axis has size 1 (a NIfTI "volume of one time point") is read as 3D.

    Raises:
        ImageReadError: missing, unreadable, truncated or multi-series input; not 3D or not one
            value per voxel; a header claiming more than :data:`MAX_VOXELS` voxels or a spacing
            that is not positive; NaN or infinite voxel values.
    """
    path = Path(path)
    where = describe_path(path, case_id)
    if not path.exists():
        raise ImageReadError(f"{where}: file not found")
    try:
        if path.is_dir():
            image = _read_dicom_series(path, where)
        else:
            _check_header(path, where)
            image = sitk.ReadImage(str(path))
            _check_complete(path, image, where)
            if image.GetDimension() == 4 and image.GetSize()[3] == 1:
                image = image[:, :, :, 0]
    except ImageReadError:
        raise
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        reason = next((line for line in first if "ERROR" in line or "Exception" in line), first[-1] if first else "")
        raise ImageReadError(f"{where}: cannot be read as an image ({reason.strip()[:300]})") from exc
    _check_image(image, where)
    if pixel_type is not None:
        image = sitk.Cast(image, pixel_type)
    return _strip_metadata(image)


def _check_header(path: Path, where: str) -> None:
    """Refuse, from the header alone, an image too large to read or of the wrong shape."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()  # RuntimeError for a file that is not an image: caught by the caller
    size = reader.GetSize()
    voxels = int(np.prod([int(v) for v in size], dtype=object))
    if voxels > MAX_VOXELS:
        raise ImageReadError(f"{where}: the header claims {' x '.join(map(str, size))} = {voxels} voxels, more than "
                             f"{MAX_VOXELS}: a corrupt header, or not a CT of one patient")


def _check_image(image: sitk.Image, where: str) -> None:
    """A 3D image of one value per voxel, positive spacing, finite values."""
    if image.GetDimension() != 3:
        raise ImageReadError(f"{where}: a {image.GetDimension()}D image ({' x '.join(map(str, image.GetSize()))}); "
                             "expected a 3D CT or mask")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageReadError(f"{where}: {image.GetNumberOfComponentsPerPixel()} values per voxel (colour or vector "
                             "image); expected one (HU, or a label)")
    spacing = image.GetSpacing()
    if not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise ImageReadError(f"{where}: voxel spacing {tuple(spacing)} mm; expected positive values")
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        bad = int(np.count_nonzero(~np.isfinite(sitk.GetArrayViewFromImage(image))))
        if bad:
            raise ImageReadError(f"{where}: {bad} voxel(s) are NaN or infinite; expected finite values (HU)")


def _check_complete(path: Path, image: sitk.Image, where: str) -> None:
    """Raise ImageReadError for a truncated file (ITK fills missing voxels silently)."""
    expected = image.GetNumberOfPixels() * image.GetNumberOfComponentsPerPixel() * image.GetSizeOfPixelComponent()
    name = path.name.lower()
    if path.stat().st_size == 0:
        raise ImageReadError(f"{where}: the file is empty (0 bytes)")
    if name.endswith(".gz"):
        try:
            with gzip.open(path, "rb") as fh:
                total = 0
                while block := fh.read(1 << 22):
                    total += len(block)
        except (EOFError, OSError, zlib.error) as exc:
            raise ImageReadError(f"{where}: truncated or corrupt compressed file ({exc})") from exc
        if total < expected:
            raise ImageReadError(f"{where}: truncated: {total} bytes of voxel data, expected at least {expected}")
    elif (name.endswith(".nii") or (name.endswith(".nrrd") and _nrrd_encoding(path) == "raw")) and (
        path.stat().st_size < expected
    ):
        raise ImageReadError(f"{where}: truncated: file has {path.stat().st_size} bytes, voxel data needs {expected}")


def _nrrd_encoding(path: Path) -> str:
    """The ``encoding`` field of an NRRD header ('raw', 'gzip', ...); '' when absent."""
    with open(path, "rb") as fh:
        for raw_line in fh:
            line = raw_line.decode("latin-1").strip()
            if not line:
                break
            if line.lower().startswith("encoding:"):
                return line.split(":", 1)[1].strip().lower()
    return ""


def _read_dicom_series(folder: Path, where: str) -> sitk.Image:
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise ImageReadError(f"{where}: folder holds no DICOM series")
    if len(series_ids) > 1:
        raise ImageReadError(
            f"{where}: folder holds {len(series_ids)} DICOM series; put each series in its own folder"
        )
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_ids[0])
    if len(files) < 2:
        raise ImageReadError(f"{where}: DICOM series has {len(files)} slice(s); a 3D CT needs at least 2")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    # Never load the per-slice tag dictionaries: they hold patient-identifying data.
    reader.MetaDataDictionaryArrayUpdateOff()
    reader.LoadPrivateTagsOff()
    return reader.Execute()


def read_mask(path: str | Path, *, label: int, case_id: str | None = None) -> sitk.Image:
    """Read a label map and return the binary mask (uint8, 0/1) of voxels equal to ``label``
    (``data.mask_label``)."""
    image = read_image(path, case_id=case_id)
    arr = sitk.GetArrayViewFromImage(image)
    if not np.issubdtype(arr.dtype, np.integer):
        rounded = np.rint(arr)
        if not np.allclose(arr, rounded):
            raise ImageReadError(f"{describe_path(Path(path), case_id)}: mask holds non-integer values; expected a label map")
    binary = sitk.Cast(sitk.Equal(sitk.Cast(image, sitk.sitkInt32), int(label)), sitk.sitkUInt8)
    return binary


def write_image(image: sitk.Image, path: str | Path, compress: bool = True) -> None:
    """Write an image (format by suffix), creating parent folders; never writes metadata tags.

    Raises:
        OutputWriteError: the disk is full or the folder read-only (ITK says only "could not write").
    """
    from bonemet.utils import UNWRITABLE, unwritable

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in UNWRITABLE:
            raise unwritable(path, exc) from exc
        raise
    image = _strip_metadata(sitk.Image(image))
    try:
        sitk.WriteImage(image, str(path), useCompression=compress)
        # ITK's NIfTI writer does not raise when a write fails (it prints "NWAD: wrote only 0 of N
        # bytes" and leaves a short file): check what landed on disk.
        _check_complete(path, image, str(path))
    except (RuntimeError, ImageReadError) as exc:
        cause = _unwritable_cause(path.parent) or errno.EIO
        raise unwritable(path, OSError(cause, os.strerror(cause))) from exc


def _unwritable_cause(folder: Path) -> int | None:
    """ENOSPC or EROFS when ``folder``'s file system is full or read-only, else None."""
    try:
        stats = os.statvfs(folder)
    except OSError:
        return None
    if stats.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if stats.f_bavail * stats.f_frsize < 64 * 1024:
        return errno.ENOSPC
    return None


def same_grid(a: sitk.Image, b: sitk.Image, *, tol_mm: float) -> tuple[bool, str]:
    """Whether two images share size, spacing, origin and direction (spacing and origin within
    ``tol_mm`` mm: ``validate.grid_tolerance_mm`` for a user's files).

    Returns ``(ok, reason)``; ``reason`` says what differs, with both values.
    """
    if a.GetSize() != b.GetSize():
        return False, f"size {b.GetSize()} != image size {a.GetSize()}"
    if not np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol_mm):
        return False, f"spacing {tuple(round(s, 4) for s in b.GetSpacing())} != image spacing {tuple(round(s, 4) for s in a.GetSpacing())}"
    if not np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol_mm):
        return False, f"origin {tuple(round(s, 3) for s in b.GetOrigin())} != image origin {tuple(round(s, 3) for s in a.GetOrigin())}"
    if not np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-4):
        return False, "direction cosines differ from the image's"
    return True, ""


def resample_to_reference(
    image: sitk.Image, reference: sitk.Image, interpolator: int = sitk.sitkNearestNeighbor, default: float = 0
) -> sitk.Image:
    """Resample ``image`` onto ``reference``'s grid (physical space), e.g. a mask back to its CT."""
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, default, image.GetPixelID())


def _check_spacing(spacing_mm: Sequence[float], dimension: int) -> tuple[float, ...]:
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != dimension or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(
            f"target spacing must be {dimension} positive numbers in mm, found {list(spacing_mm)}"
        )
    return spacing


def resampled_grid(image: sitk.Image, spacing_mm: Sequence[float]) -> sitk.Image:
    """An empty reference image: ``image``'s origin and direction, ``spacing_mm``, same physical extent.

    Args:
        image: the image whose physical extent is kept.
        spacing_mm: target voxel size in mm, (x, y, z) order as SimpleITK.
    """
    spacing = _check_spacing(spacing_mm, image.GetDimension())
    extent_mm = np.asarray(image.GetSize(), float) * np.asarray(image.GetSpacing(), float)
    size = [max(1, int(round(e / s))) for e, s in zip(extent_mm, spacing, strict=True)]
    reference = sitk.Image(size, sitk.sitkUInt8)
    reference.SetSpacing(spacing)
    reference.SetOrigin(image.GetOrigin())
    reference.SetDirection(image.GetDirection())
    return reference
