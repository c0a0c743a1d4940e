"""One case: resample, crop to the bone, normalise; and map a mask back to the original CT."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from bonemet.data.io import same_grid
from bonemet.preprocessing.crop import bone_crop_box, box_reference, source_region, voxels_outside_box
from bonemet.preprocessing.intensity import check_window, normalise_intensity
from bonemet.preprocessing.resample import INTERPOLATORS, resample_mask, resampled_grid

log = logging.getLogger(__name__)


# Voxels of the original CT kept around the crop before resampling: covers the cubic B-spline's
# support (2 voxels) and the decay of its prefilter at the region's edge.
SOURCE_PAD_VOX = 8


class PreprocessError(ValueError):
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
    *,
    target_spacing_mm: Sequence[float],
    image_interpolator: str,
    hu_window: Sequence[float],
    bone_threshold_hu: float,
    margin_mm: float,
    min_size_vox: Sequence[int],
    min_component_ml: float,
    mask_interpolator: str,
    case_id: str | None,
) -> PreprocessedCase:
    lo, _ = check_window(hu_window)
    if image_hu.GetDimension() != 3:
        raise PreprocessError(f"{_where(case_id)}: expected a 3D image, found {image_hu.GetDimension()}D")
    if image_interpolator not in ("bspline", "linear"):
        raise ValueError(f"image interpolator must be 'bspline' or 'linear', found '{image_interpolator}'")
    if manual_mask is not None:
        ok, reason = same_grid(image_hu, manual_mask)
        if not ok:
            raise PreprocessError(f"{_where(case_id)}: mask is not on the image grid: {reason}")
    # The box is found on the original CT and expressed in the resampled grid; then only the
    # box is resampled (from the part of the CT around it): the same values as resampling the
    # whole CT and cropping, at a fraction of the cost for a 512 x 512 x N scan.
    grid = resampled_grid(image_hu, target_spacing_mm)
    box = bone_crop_box(image_hu, bone_threshold_hu, margin_mm, min_size_vox, min_component_ml, grid=grid)
    reference = box_reference(grid, box)
    source = sitk.Cast(source_region(image_hu, reference, SOURCE_PAD_VOX), sitk.sitkFloat32)
    # Outside the CT (padding) takes the window minimum: 0 after normalisation.
    resampled = sitk.Resample(
        source, reference, sitk.Transform(), INTERPOLATORS[image_interpolator], lo, sitk.sitkFloat32
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
            source_region(manual_mask, reference, SOURCE_PAD_VOX), reference, mask_interpolator
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


def preprocess_image(
    image_hu: sitk.Image,
    *,
    target_spacing_mm: Sequence[float],
    image_interpolator: str = "bspline",
    hu_window: Sequence[float] = (-200.0, 1800.0),
    bone_threshold_hu: float = 200.0,
    margin_mm: float = 10.0,
    min_size_vox: Sequence[int] = (64, 64, 64),
    min_component_ml: float = 1.0,
    case_id: str | None = None,
) -> PreprocessedCase:
    """Preprocess a CT without a mask (inference on a new CT); ``mask`` of the result is None.

    Steps: find the bone box (voxels above ``bone_threshold_hu`` HU, components of at least
    ``min_component_ml`` ml, plus ``margin_mm`` mm, at least ``min_size_vox`` voxels) on the
    CT, in the index space of the grid resampled to ``target_spacing_mm`` (mm, same origin,
    direction and physical extent); resample the box with ``image_interpolator`` (padding with
    the window minimum outside the CT); clip to ``hu_window`` (HU) and scale to [0, 1]. The
    values equal resampling the whole CT (:func:`resample_image`) then cropping
    (:func:`crop_to_box`), at a fraction of the cost.

    ``geometry`` holds the original size/spacing/origin/direction, the resampled spacing and
    size, the crop start index (in the resampled grid; negative where padded) and size, so a
    result can be mapped back; :func:`map_mask_to_original` only needs the output's header.
    """
    return _preprocess(
        image_hu,
        None,
        target_spacing_mm=target_spacing_mm,
        image_interpolator=image_interpolator,
        hu_window=hu_window,
        bone_threshold_hu=bone_threshold_hu,
        margin_mm=margin_mm,
        min_size_vox=min_size_vox,
        min_component_ml=min_component_ml,
        mask_interpolator="nearest",
        case_id=case_id,
    )


def preprocess_case(
    image_hu: sitk.Image,
    manual_mask: sitk.Image,
    *,
    target_spacing_mm: Sequence[float],
    image_interpolator: str = "bspline",
    hu_window: Sequence[float] = (-200.0, 1800.0),
    bone_threshold_hu: float = 200.0,
    margin_mm: float = 10.0,
    min_size_vox: Sequence[int] = (64, 64, 64),
    min_component_ml: float = 1.0,
    mask_interpolator: str = "nearest",
    case_id: str | None = None,
) -> PreprocessedCase:
    """Preprocess a CT and its binary lesion mask (uint8 0/1 on the CT grid) alike.

    The crop box comes from the CT alone (as in :func:`preprocess_image`), never from the mask;
    the mask is resampled (``mask_interpolator``, see
    :func:`~bonemet.preprocessing.resample.resample_mask`) onto the resampled CT grid and cropped with
    the same box. Lesion voxels outside the box are counted in
    ``geometry["mask_voxels_outside_crop"]`` and logged as a warning.

    Raises:
        PreprocessError: the mask is not on the image's grid, or the image is not 3D.
    """
    return _preprocess(
        image_hu,
        manual_mask,
        target_spacing_mm=target_spacing_mm,
        image_interpolator=image_interpolator,
        hu_window=hu_window,
        bone_threshold_hu=bone_threshold_hu,
        margin_mm=margin_mm,
        min_size_vox=min_size_vox,
        min_component_ml=min_component_ml,
        mask_interpolator=mask_interpolator,
        case_id=case_id,
    )


def map_mask_to_original(
    mask_in_crop_space: sitk.Image, original_image: sitk.Image, interpolator: str = "nearest"
) -> sitk.Image:
    """Map a mask on the preprocessed (resampled, cropped) grid back onto the original CT grid.

    Resampling in physical space (the preprocessed header keeps origin, spacing and
    direction), nearest neighbour by default (``"linear"``: lesion fraction >= 0.5); voxels of
    the original CT outside the crop get 0. Returns uint8 0/1 on ``original_image``'s grid.
    """
    return resample_mask(mask_in_crop_space, original_image, interpolator)


def dice(a: sitk.Image, b: sitk.Image) -> float:
    """Dice overlap of two binary masks on the same grid (1.0 when both are empty)."""
    x = sitk.GetArrayViewFromImage(a) > 0
    y = sitk.GetArrayViewFromImage(b) > 0
    denom = int(x.sum()) + int(y.sum())
    return 1.0 if denom == 0 else 2.0 * int(np.logical_and(x, y).sum()) / denom
