"""Cropping to the bone: a box found from the CT alone, so it works for new CTs without a mask."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CropBox:
    """A box in an image's index space, (x, y, z) order as SimpleITK.

    ``start`` may be negative and ``start + size`` may pass the image's size: those voxels are
    padding (the image was smaller than the minimum crop size).
    """

    start: tuple[int, ...]
    size: tuple[int, ...]

    @property
    def stop(self) -> tuple[int, ...]:
        return tuple(b + n for b, n in zip(self.start, self.size, strict=True))


def bone_mask(image_hu: sitk.Image, bone_threshold_hu: float, min_component_ml: float) -> sitk.Image:
    """Voxels above ``bone_threshold_hu`` (HU), keeping connected components of at least ``min_component_ml``.

    Small components are noise specks or calcifications, not the spine. When no component is
    that large, the largest one is kept. Returns uint8 0/1 (all zero when no voxel is bright).
    """
    binary = sitk.Cast(sitk.Greater(sitk.Cast(image_hu, sitk.sitkFloat32), float(bone_threshold_hu)), sitk.sitkUInt8)
    labels = sitk.RelabelComponent(sitk.ConnectedComponent(binary, True), sortByObjectSize=True)
    arr = sitk.GetArrayViewFromImage(labels)
    if arr.max() == 0:
        return binary
    voxel_ml = float(np.prod(image_hu.GetSpacing())) / 1000.0
    counts = np.bincount(arr.ravel())[1:]
    keep = max(1, int(np.sum(counts * voxel_ml >= min_component_ml)))
    out = sitk.Cast(sitk.BinaryThreshold(labels, 1, keep, 1, 0), sitk.sitkUInt8)
    out.CopyInformation(image_hu)
    return out


def bone_crop_box(
    image_hu: sitk.Image,
    bone_threshold_hu: float,
    margin_mm: float,
    min_size_vox: Sequence[int],
    min_component_ml: float = 1.0,
) -> CropBox:
    """The bounding box of the bone plus a margin, clamped to the image, at least ``min_size_vox``.

    Uses only the CT (never a lesion mask), so training and inference on a new CT crop alike.

    Args:
        image_hu: CT in Hounsfield units (usually already resampled).
        bone_threshold_hu: voxels above this HU are bone candidates.
        margin_mm: added on every side of the bone's bounding box, in mm (so lesions breaking
            through the cortex and the bone's surroundings stay in the crop).
        min_size_vox: minimum box size in voxels, (x, y, z); the box grows symmetrically around
            the bone, and beyond the image (padding) only when the image itself is smaller.
        min_component_ml: bone components smaller than this volume (ml) are ignored.
    """
    dim = image_hu.GetDimension()
    image_size = np.asarray(image_hu.GetSize(), int)
    min_size = np.asarray([int(v) for v in min_size_vox], int)
    if min_size.shape != (dim,) or np.any(min_size < 1):
        raise ValueError(f"min_size_vox must be {dim} positive integers, found {list(min_size_vox)}")
    if margin_mm < 0:
        raise ValueError(f"margin_mm must be >= 0, found {margin_mm}")
    bone = sitk.GetArrayViewFromImage(bone_mask(image_hu, bone_threshold_hu, min_component_ml))
    if not bone.any():
        log.warning("no voxel above %s HU: cropping to the whole image", bone_threshold_hu)
        lo, hi = np.zeros(dim, int), image_size.copy()
    else:
        # numpy axes are (z, y, x); reverse to SimpleITK's (x, y, z).
        lo, hi = np.zeros(dim, int), np.zeros(dim, int)
        for axis in range(dim):
            other = tuple(a for a in range(dim) if a != axis)
            present = np.flatnonzero(bone.any(axis=other))
            lo[dim - 1 - axis], hi[dim - 1 - axis] = present[0], present[-1] + 1
        margin = np.asarray([math.ceil(margin_mm / s) for s in image_hu.GetSpacing()], int)
        lo, hi = np.maximum(lo - margin, 0), np.minimum(hi + margin, image_size)
    start, size = lo.copy(), hi - lo
    for axis in range(dim):
        need = min_size[axis] - size[axis]
        if need <= 0:
            continue
        begin = lo[axis] - need // 2
        if image_size[axis] >= min_size[axis]:  # fits inside the image: shift instead of padding
            begin = int(np.clip(begin, 0, image_size[axis] - min_size[axis]))
        else:  # image too small: centre the image in the padded box
            begin = -((min_size[axis] - image_size[axis]) // 2)
        start[axis], size[axis] = begin, min_size[axis]
    return CropBox(tuple(int(v) for v in start), tuple(int(v) for v in size))


def crop_to_box(image: sitk.Image, box: CropBox, pad_value: float) -> sitk.Image:
    """Extract ``box`` from ``image``, padding with ``pad_value`` where it passes the image's edges.

    The result keeps physical geometry: its origin is the physical point of ``box.start``.
    """
    size = np.asarray(image.GetSize(), int)
    start, stop = np.asarray(box.start, int), np.asarray(box.stop, int)
    inner_lo, inner_hi = np.maximum(start, 0), np.minimum(stop, size)
    if np.any(inner_hi <= inner_lo):
        raise ValueError(f"crop box {box} does not overlap the image of size {tuple(size)}")
    out = sitk.RegionOfInterest(image, [int(v) for v in inner_hi - inner_lo], [int(v) for v in inner_lo])
    pad_lo, pad_hi = inner_lo - start, stop - inner_hi
    if np.any(pad_lo > 0) or np.any(pad_hi > 0):
        out = sitk.ConstantPad(out, [int(v) for v in pad_lo], [int(v) for v in pad_hi], float(pad_value))
    # Normalise the index to zero with the matching origin (the physical point of box.start).
    origin = image.TransformContinuousIndexToPhysicalPoint([float(v) for v in start])
    result = sitk.Image(out)
    result.SetOrigin(origin)
    return result
