"""Resampling CT images and lesion masks to one voxel size.

All geometry is physical (mm, LPS) as SimpleITK holds it. Resampling keeps the origin (the
centre of the first voxel) and the direction cosines, and chooses the new size so that the
physical extent ``size * spacing`` is preserved: ``new_size = round(size * spacing / new_spacing)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import SimpleITK as sitk

from bonemet.data.io import resample_to_reference, resampled_grid

INTERPOLATORS: dict[str, int] = {
    "bspline": sitk.sitkBSpline,
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
}


def resample_image(
    image: sitk.Image, spacing_mm: Sequence[float], interpolator: str
) -> sitk.Image:
    """Resample a CT image (HU) to ``spacing_mm`` and return it as float32.

    Args:
        image: CT in Hounsfield units (any pixel type).
        spacing_mm: target voxel size in mm, (x, y, z).
        interpolator: ``"bspline"`` (cubic; sharper, may overshoot a little at edges, which the
            later HU window clips) or ``"linear"`` (no overshoot, slightly smoother).

    Samples falling outside the input (at most half a voxel at the far edges) take the image
    minimum, i.e. air for a CT.
    """
    if interpolator not in ("bspline", "linear"):
        raise ValueError(f"image interpolator must be 'bspline' or 'linear', found '{interpolator}'")
    reference = resampled_grid(image, spacing_mm)
    image = sitk.Cast(image, sitk.sitkFloat32)
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(image)
    return sitk.Resample(
        image, reference, sitk.Transform(), INTERPOLATORS[interpolator], stats.GetMinimum(), sitk.sitkFloat32
    )


MASK_INTERPOLATORS = ("nearest", "linear")


def resample_mask(mask: sitk.Image, reference: sitk.Image, interpolator: str) -> sitk.Image:
    """Resample a binary mask onto ``reference``'s grid; uint8 0/1 either way.

    Args:
        mask: binary mask (any pixel type; nonzero is lesion).
        reference: the target grid.
        interpolator: ``"nearest"`` (every output voxel copies one input voxel)
            or ``"linear"`` (interpolate the 0/1 mask as a lesion fraction, keep voxels whose
            fraction is >= 0.5: a smoother, more faithful boundary when voxel sizes differ a lot).
    """
    binary = sitk.Cast(sitk.NotEqual(mask, 0), sitk.sitkUInt8)
    if interpolator == "nearest":
        return sitk.Cast(
            resample_to_reference(binary, reference, sitk.sitkNearestNeighbor, 0), sitk.sitkUInt8
        )
    if interpolator == "linear":
        fraction = resample_to_reference(sitk.Cast(binary, sitk.sitkFloat32), reference, sitk.sitkLinear, 0)
        return sitk.Cast(sitk.GreaterEqual(fraction, 0.5), sitk.sitkUInt8)
    raise ValueError(f"mask interpolator must be one of {MASK_INTERPOLATORS}, found '{interpolator}'")


def resample_mask_to_spacing(
    mask: sitk.Image, spacing_mm: Sequence[float], interpolator: str
) -> sitk.Image:
    """Resample a binary mask to ``spacing_mm`` (mm), same physical extent; uint8 0/1."""
    return resample_mask(mask, resampled_grid(mask, spacing_mm), interpolator)
