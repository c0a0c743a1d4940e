"""Preprocessing: resampling to one voxel size, HU normalisation, cropping to the bone.

Typed functions on SimpleITK images (physical geometry in mm, intensities in HU until
normalised); :func:`preprocess_cohort` runs them over a cohort for the ``preprocess`` stage.
"""

from bonemet.preprocessing.cohort import CASES_TABLE, preprocess_cohort, read_preprocessed
from bonemet.preprocessing.crop import CropBox, bone_crop_box, bone_mask, crop_to_box
from bonemet.preprocessing.intensity import normalise_intensity
from bonemet.preprocessing.pipeline import (
    PreprocessedCase,
    PreprocessError,
    map_mask_to_original,
    preprocess_case,
    preprocess_image,
)
from bonemet.preprocessing.resample import (
    resample_image,
    resample_mask,
    resample_mask_to_spacing,
    resampled_grid,
)

__all__ = [
    "CASES_TABLE",
    "CropBox",
    "PreprocessError",
    "PreprocessedCase",
    "bone_crop_box",
    "bone_mask",
    "crop_to_box",
    "map_mask_to_original",
    "normalise_intensity",
    "preprocess_case",
    "preprocess_cohort",
    "preprocess_image",
    "read_preprocessed",
    "resample_image",
    "resample_mask",
    "resample_mask_to_spacing",
    "resampled_grid",
]
