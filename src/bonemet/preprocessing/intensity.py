"""Intensity normalisation on the Hounsfield scale."""

from __future__ import annotations

from collections.abc import Sequence

import SimpleITK as sitk


def check_window(hu_window: Sequence[float]) -> tuple[float, float]:
    """Validate an HU window ``(lo, hi)`` with ``lo < hi``; return it as floats."""
    if len(hu_window) != 2 or not float(hu_window[0]) < float(hu_window[1]):
        raise ValueError(f"hu_window must be [lo, hi] in HU with lo < hi, found {list(hu_window)}")
    return float(hu_window[0]), float(hu_window[1])


def normalise_intensity(image: sitk.Image, hu_window: Sequence[float]) -> sitk.Image:
    """Clip a CT (HU) to ``hu_window`` and scale linearly to [0, 1]; float32.

    ``(x - lo) / (hi - lo)`` after clipping to ``[lo, hi]`` HU. Why a fixed window and not a
    per-image z-score: Hounsfield units are already a calibrated, scanner-independent physical
    scale (water 0, air -1000), so one fixed window maps the same tissue to the same value on
    every scanner. A per-image mean/std would instead depend on the field of view (how much
    air, fat or bone happens to be in the image) and so move the lesion's values between
    cases. The default window spans fat/soft tissue (-200 HU) to dense cortical bone and
    osteoblastic lesions (1800 HU); metal and air saturate, which no bone feature needs.
    """
    lo, hi = check_window(hu_window)
    clipped = sitk.Clamp(sitk.Cast(image, sitk.sitkFloat32), sitk.sitkFloat32, lo, hi)
    return sitk.Cast((clipped - lo) / (hi - lo), sitk.sitkFloat32)
