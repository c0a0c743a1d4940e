"""Cohort data: the manifest (case table), image I/O and the synthetic cohort."""

from bonemet.data.io import ImageReadError, read_image, read_mask, write_image
from bonemet.data.manifest import Case, ManifestError, read_manifest

__all__ = [
    "Case",
    "ImageReadError",
    "ManifestError",
    "read_image",
    "read_manifest",
    "read_mask",
    "write_image",
]
