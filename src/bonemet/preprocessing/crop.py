"""Cropping to the bone: a box found from the CT alone, so it works for new CTs without a mask."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from bonemet.data.masks import volume_ml

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
    binary = sitk.Cast(
        sitk.Greater(sitk.Cast(image_hu, sitk.sitkFloat32), float(bone_threshold_hu)), sitk.sitkUInt8
    )
    relabel = sitk.RelabelComponentImageFilter()
    relabel.SortByObjectSizeOn()
    labels = relabel.Execute(sitk.ConnectedComponent(binary, True))
    if relabel.GetNumberOfObjects() == 0:
        return binary
    # the filter's own counts (largest first): a bincount over a 512 x 512 x N label image costs a second
    counts = np.asarray(relabel.GetSizeOfObjectsInPixels(), float)
    keep = max(1, int(np.sum(counts * volume_ml(1, image_hu.GetSpacing()) >= min_component_ml)))
    out = sitk.Cast(sitk.BinaryThreshold(labels, 1, keep, 1, 0), sitk.sitkUInt8)
    out.CopyInformation(image_hu)
    return out


def _index_to_grid(image: sitk.Image, grid: sitk.Image, index: np.ndarray) -> np.ndarray:
    """Continuous indices (N, 3) of ``image`` -> continuous indices in ``grid`` (via physical space)."""

    def matrix(img: sitk.Image) -> np.ndarray:
        d = img.GetDimension()
        return np.asarray(img.GetDirection(), float).reshape(d, d) @ np.diag(img.GetSpacing())

    physical = np.asarray(image.GetOrigin(), float) + index @ matrix(image).T
    return np.linalg.solve(matrix(grid), (physical - np.asarray(grid.GetOrigin(), float)).T).T


def bone_crop_box(
    image_hu: sitk.Image,
    bone_threshold_hu: float,
    margin_mm: float,
    min_size_vox: Sequence[int],
    min_component_ml: float,
    grid: sitk.Image | None = None,
) -> CropBox:
    """The bounding box of the bone plus a margin, clamped to the grid, at least ``min_size_vox``.

    Uses only the CT (never a lesion mask), so training and inference on a new CT crop alike.

    Args:
        image_hu: CT in Hounsfield units; the bone is found on its own grid.
        bone_threshold_hu: voxels above this HU are bone candidates.
        margin_mm: added on every side of the bone's bounding box, in mm (so lesions breaking
            through the cortex and the bone's surroundings stay in the crop).
        min_size_vox: minimum box size in voxels, (x, y, z); the box grows symmetrically around
            the bone, and beyond the grid (padding) only when the grid itself is smaller.
        min_component_ml: bone components smaller than this volume (ml) are ignored.
        grid: the grid whose index space the box is in (e.g. the resampled grid, so only the
            crop needs resampling); default ``image_hu``'s own grid.
    """
    grid = image_hu if grid is None else grid
    dim = grid.GetDimension()
    grid_size = np.asarray(grid.GetSize(), int)
    min_size = np.asarray([int(v) for v in min_size_vox], int)
    if min_size.shape != (dim,) or np.any(min_size < 1):
        raise ValueError(f"min_size_vox must be {dim} positive integers, found {list(min_size_vox)}")
    if margin_mm < 0:
        raise ValueError(f"margin_mm must be >= 0, found {margin_mm}")
    bone = sitk.GetArrayFromImage(bone_mask(image_hu, bone_threshold_hu, min_component_ml)).astype(bool)
    if not bone.any():
        log.warning("no voxel above %s HU: cropping to the whole image", bone_threshold_hu)
        lo, hi = np.zeros(dim, int), grid_size.copy()
    else:
        # numpy axes are (z, y, x); reverse to SimpleITK's (x, y, z). Bounds of voxel centres.
        first, last = np.zeros(dim), np.zeros(dim)
        for axis in range(dim):
            other = tuple(a for a in range(dim) if a != axis)
            present = np.flatnonzero(bone.any(axis=other))
            first[dim - 1 - axis], last[dim - 1 - axis] = present[0], present[-1]
        corners = np.array(
            [[(first, last)[(c >> a) & 1][a] for a in range(dim)] for c in range(2**dim)], float
        )
        in_grid = _index_to_grid(image_hu, grid, corners)
        lo = np.floor(in_grid.min(axis=0) + 1e-6).astype(int)
        hi = np.ceil(in_grid.max(axis=0) - 1e-6).astype(int) + 1
        margin = np.asarray([math.ceil(margin_mm / s - 1e-9) for s in grid.GetSpacing()], int)
        lo, hi = np.maximum(lo - margin, 0), np.minimum(hi + margin, grid_size)
    start, size = lo.copy(), hi - lo
    for axis in range(dim):
        need = min_size[axis] - size[axis]
        if need <= 0:
            continue
        begin = lo[axis] - need // 2
        if grid_size[axis] >= min_size[axis]:  # fits inside the grid: shift instead of padding
            begin = int(np.clip(begin, 0, grid_size[axis] - min_size[axis]))
        else:  # grid too small: centre it in the padded box
            begin = -((min_size[axis] - grid_size[axis]) // 2)
        start[axis], size[axis] = begin, min_size[axis]
    return CropBox(tuple(int(v) for v in start), tuple(int(v) for v in size))


def box_reference(grid: sitk.Image, box: CropBox) -> sitk.Image:
    """An empty image on ``box`` of ``grid``: same spacing and direction, origin at ``box.start``."""
    reference = sitk.Image([int(v) for v in box.size], sitk.sitkUInt8)
    reference.SetSpacing(grid.GetSpacing())
    reference.SetDirection(grid.GetDirection())
    reference.SetOrigin(grid.TransformContinuousIndexToPhysicalPoint([float(v) for v in box.start]))
    return reference


def source_region(image: sitk.Image, reference: sitk.Image, pad_vox: int) -> sitk.Image:
    """The part of ``image`` that covers ``reference``'s physical box plus ``pad_vox`` voxels.

    Resampling from this region instead of the whole image gives the same values (the
    interpolator's support lies inside) at a fraction of the cost for large CTs.
    """
    start, size = source_box(image, reference, pad_vox)
    return sitk.RegionOfInterest(image, list(size), list(start))


def source_box(image: sitk.Image, reference: sitk.Image, pad_vox: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(start, size)`` in ``image``'s index space (x, y, z) of :func:`source_region`'s region:
    the voxels of ``image`` whose centres lie within ``reference``'s physical box (voxel edges
    included) plus ``pad_vox`` voxels, clamped to the image (one voxel when they do not overlap)."""
    dim = reference.GetDimension()
    size = np.asarray(reference.GetSize(), float)
    corners = np.array([[(-0.5, size[a] - 0.5)[(c >> a) & 1] for a in range(dim)] for c in range(2**dim)])
    in_image = _index_to_grid(reference, image, corners)
    image_size = np.asarray(image.GetSize(), int)
    lo = np.maximum(np.floor(in_image.min(axis=0)).astype(int) - pad_vox, 0)
    hi = np.minimum(np.ceil(in_image.max(axis=0)).astype(int) + pad_vox + 1, image_size)
    if np.any(hi <= lo):  # the box lies outside the image: keep one voxel so resampling pads
        lo, hi = np.zeros(dim, int), np.ones(dim, int)
    return tuple(int(v) for v in lo), tuple(int(v) for v in hi - lo)


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


def voxels_outside_box(mask: sitk.Image, grid: sitk.Image, box: CropBox) -> tuple[int, int]:
    """``(lesion voxels, of which outside box)``: ``mask``'s nonzero voxel centres vs ``box`` of ``grid``."""
    idx = np.argwhere(sitk.GetArrayFromImage(mask) > 0)[:, ::-1].astype(float)  # (x, y, z)
    if len(idx) == 0:
        return 0, 0
    in_grid = _index_to_grid(mask, grid, idx)
    start, stop = np.asarray(box.start) - 0.5, np.asarray(box.stop) - 0.5
    inside = np.all((in_grid >= start) & (in_grid < stop), axis=1)
    return int(len(idx)), int(np.sum(~inside))
