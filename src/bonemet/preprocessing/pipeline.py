"""One case: resample, crop to the bone, normalise; and map a mask back to the original CT."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import SimpleITK as sitk

from bonemet.data.io import same_grid
from bonemet.errors import UserError
from bonemet.preprocessing.crop import bone_crop_box, box_reference, source_region, voxels_outside_box
from bonemet.preprocessing.intensity import check_window, normalise_intensity
from bonemet.preprocessing.resample import INTERPOLATORS, resample_mask, resampled_grid

if TYPE_CHECKING:  # pragma: no cover
    from bonemet.config import PlannedPreprocessSpec

log = logging.getLogger(__name__)


# Voxels of the original CT kept around the crop before resampling: covers the cubic B-spline's
# support (2 voxels) and the decay of its prefilter at the region's edge.
SOURCE_PAD_VOX = 8


class PreprocessError(UserError, ValueError):
    """A case could not be preprocessed; the message names the case and why."""


@dataclass
class PreprocessedCase:
    """A preprocessed case.

    Attributes:
        image: float32 in [0, 1], resampled and cropped; physical geometry in its header.
        mask: uint8 0/1 on ``image``'s grid, or None (inference on a CT without a mask).
        geometry: JSON-serialisable record to map results back (see :func:`preprocess_image`).
    """

    image: sitk.Image
    mask: sitk.Image | None
    geometry: dict[str, Any]


def _where(case_id: str | None) -> str:
    return f"case '{case_id}'" if case_id else "image"


def _preprocess(
    image_hu: sitk.Image,
    manual_mask: sitk.Image | None,
    spec: PlannedPreprocessSpec,
    *,
    grid_tolerance_mm: float,
    case_id: str | None,
) -> PreprocessedCase:
    hu_window = spec.hu_window
    lo, _ = check_window(hu_window)
    if image_hu.GetDimension() != 3:
        raise PreprocessError(f"{_where(case_id)}: expected a 3D image, found {image_hu.GetDimension()}D")
    if manual_mask is not None:
        ok, reason = same_grid(image_hu, manual_mask, tol_mm=grid_tolerance_mm)
        if not ok:
            raise PreprocessError(f"{_where(case_id)}: mask is not on the image grid: {reason}")
    # The box is found on the original CT and expressed in the resampled grid; then only the
    # box is resampled (from the part of the CT around it): the same values as resampling the
    # whole CT and cropping, at a fraction of the cost for a 512 x 512 x N scan.
    grid = resampled_grid(image_hu, spec.target_spacing_mm)
    crop = spec.crop
    box = bone_crop_box(image_hu, crop.bone_threshold_hu, crop.margin_mm, crop.min_size_vox, crop.min_component_ml,
                        grid=grid)
    reference = box_reference(grid, box)
    source = sitk.Cast(source_region(image_hu, reference, SOURCE_PAD_VOX), sitk.sitkFloat32)
    # Outside the CT (padding) takes the window minimum: 0 after normalisation.
    resampled = sitk.Resample(
        source, reference, sitk.Transform(), INTERPOLATORS[spec.image_interpolator], lo, sitk.sitkFloat32
    )
    image = normalise_intensity(resampled, hu_window)
    grid_size = grid.GetSize()
    geometry: dict[str, Any] = {
        "case_id": case_id,
        "original_size": list(image_hu.GetSize()),
        "original_spacing_mm": list(image_hu.GetSpacing()),
        "original_origin_mm": list(image_hu.GetOrigin()),
        "original_direction": list(image_hu.GetDirection()),
        "resampled_spacing_mm": list(grid.GetSpacing()),
        "resampled_size": list(grid_size),
        "crop_start_index": list(box.start),
        "crop_size": list(box.size),
        "padded": bool(
            any(s < 0 for s in box.start) or any(e > n for e, n in zip(box.stop, grid_size, strict=True))
        ),
        "cropped_origin_mm": list(image.GetOrigin()),
        "hu_window": [float(v) for v in hu_window],
    }
    mask = None
    if manual_mask is not None:
        mask = resample_mask(
            source_region(manual_mask, reference, SOURCE_PAD_VOX), reference, spec.mask_interpolator
        )
        total, outside = voxels_outside_box(manual_mask, grid, box)
        geometry["mask_voxels"] = int(sitk.GetArrayViewFromImage(mask).sum())
        geometry["mask_voxels_outside_crop"] = outside  # counted on the original grid
        if geometry["mask_voxels"] == 0:
            log.warning(
                "%s: the lesion mask is empty after preprocessing (%d voxels before)", _where(case_id), total
            )
        if outside:
            log.warning(
                "%s: %d of %d lesion voxels fall outside the bone crop (raise preprocess.crop.margin_mm)",
                _where(case_id),
                outside,
                total,
            )
    return PreprocessedCase(image=image, mask=mask, geometry=geometry)


def preprocess_image(image_hu: sitk.Image, spec: PlannedPreprocessSpec, *, case_id: str | None = None) -> PreprocessedCase:
    """Preprocess a CT without a mask (inference on a new CT); ``mask`` of the result is None.

    Steps (``spec`` is the ``preprocess`` params): find the bone box (voxels above
    ``crop.bone_threshold_hu`` HU, components of at least ``crop.min_component_ml`` ml, plus
    ``crop.margin_mm`` mm, at least ``crop.min_size_vox`` voxels) on the CT, in the index space
    of the grid resampled to ``target_spacing_mm`` (mm, same origin, direction and physical
    extent); resample the box with ``image_interpolator`` (padding with the window minimum
    outside the CT); clip to ``hu_window`` (HU) and scale to [0, 1]. The values equal
    resampling the whole CT (:func:`resample_image`) then cropping (:func:`crop_to_box`), at a
    fraction of the cost.

    ``geometry`` holds the original size/spacing/origin/direction, the resampled spacing and
    size, the crop start index (in the resampled grid; negative where padded) and size, so a
    result can be mapped back; :func:`map_mask_to_original` only needs the output's header.
    """
    return _preprocess(image_hu, None, spec, grid_tolerance_mm=0.0, case_id=case_id)


def preprocess_case(
    image_hu: sitk.Image,
    manual_mask: sitk.Image,
    spec: PlannedPreprocessSpec,
    *,
    grid_tolerance_mm: float,
    case_id: str | None = None,
) -> PreprocessedCase:
    """Preprocess a CT and its binary lesion mask (uint8 0/1 on the CT grid) alike.

    The crop box comes from the CT alone (as in :func:`preprocess_image`), never from the mask;
    the mask is resampled (``spec.mask_interpolator``, see
    :func:`~bonemet.preprocessing.resample.resample_mask`) onto the resampled CT grid and cropped with
    the same box. Lesion voxels outside the box are counted in
    ``geometry["mask_voxels_outside_crop"]`` and logged as a warning. The mask's spacing and
    origin may differ from the CT's by ``grid_tolerance_mm`` (``validate.grid_tolerance_mm``).

    Raises:
        PreprocessError: the mask is not on the image's grid, or the image is not 3D.
    """
    return _preprocess(image_hu, manual_mask, spec, grid_tolerance_mm=grid_tolerance_mm, case_id=case_id)


def map_mask_to_original(mask_in_crop_space: sitk.Image, original_image: sitk.Image, interpolator: str) -> sitk.Image:
    """Map a mask on the preprocessed (resampled, cropped) grid back onto the original CT grid.

    Resampling in physical space (the preprocessed header keeps origin, spacing and
    direction), ``"nearest"`` neighbour or ``"linear"`` (lesion fraction >= 0.5); voxels of
    the original CT outside the crop get 0. Returns uint8 0/1 on ``original_image``'s grid.
    """
    return resample_mask(mask_in_crop_space, original_image, interpolator)
