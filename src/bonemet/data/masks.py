"""Lesion masks as quantities: volume in mL and the Dice overlap, one definition each.

Volumes use the voxel spacing in mm (1 mL = 1000 mm^3). Dice is 1.0 when both masks are
empty. Every stage (validation, preprocessing, segmentation metrics, prediction) calls these.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

MM3_PER_ML = 1000.0


def volume_ml(n_voxels: int | float, spacing_mm: Sequence[float]) -> float:
    """Volume in mL of ``n_voxels`` voxels of ``spacing_mm`` (any axis order)."""
    return float(n_voxels) * float(np.prod([float(s) for s in spacing_mm])) / MM3_PER_ML


def mask_volume_ml(mask: sitk.Image) -> float:
    """Volume in mL of the nonzero voxels of a SimpleITK mask (its spacing in mm)."""
    return volume_ml(int(np.count_nonzero(sitk.GetArrayViewFromImage(mask))), mask.GetSpacing())


def dice(a: np.ndarray | sitk.Image, b: np.ndarray | sitk.Image) -> float:
    """Dice coefficient of two binary masks on the same grid (arrays or SimpleITK images; 1.0 when
    both are empty)."""
    x = (sitk.GetArrayViewFromImage(a) if isinstance(a, sitk.Image) else np.asarray(a)).astype(bool)
    y = (sitk.GetArrayViewFromImage(b) if isinstance(b, sitk.Image) else np.asarray(b)).astype(bool)
    total = int(x.sum()) + int(y.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(x, y).sum()) / total
