"""The cohort's fingerprint: what the planned settings depend on, measured on the raw CTs and masks.

Per case (on its own grid, in HU and mm): voxel spacing and image size; the lesion's voxel count,
volume (mL) and bounding-box extent (mm per axis); the bone region (the preprocessing's bone crop
box, found from the CT alone) and its extent; the share of lesion voxels in the image and in the
bone region (the voxel class balance); a seeded sample of HU values inside the lesion and inside
the bone region. The cohort's fingerprint pools them: spacing and size distributions, lesion
sizes, HU percentiles, class balance. Deterministic: the samples are seeded by the case id and
the cases are pooled in manifest order, so the same cohort gives the same fingerprint whatever
the number of worker processes.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from bonemet.data.masks import volume_ml
from bonemet.utils import progress, resolve_jobs

if TYPE_CHECKING:  # pragma: no cover
    from bonemet.config import CropSpec
    from bonemet.data.manifest import Case

log = logging.getLogger(__name__)

#: HU percentiles reported for the lesions and the bone region (the plan uses its own from the samples)
REPORTED_PERCENTILES = (0.5, 1.0, 5.0, 25.0, 50.0, 75.0, 95.0, 99.0, 99.5)


@dataclass(frozen=True)
class CaseFingerprint:
    """One case's measurements (axes x, y, z as SimpleITK; mm, HU, mL)."""

    case_id: str
    spacing_mm: tuple[float, float, float]
    size_vox: tuple[int, int, int]
    lesion_voxels: int
    lesion_volume_ml: float
    #: bounding box of the lesion voxels (voxel count x spacing); zeros for an empty mask
    lesion_extent_mm: tuple[float, float, float]
    lesion_hu_median: float | None
    bone_box_extent_mm: tuple[float, float, float]
    lesion_fraction_image: float
    lesion_fraction_bone_box: float
    lesion_hu_sample: np.ndarray = field(repr=False, compare=False)
    bone_hu_sample: np.ndarray = field(repr=False, compare=False)
    #: the CT's path (for messages only: plan.json leaves paths out, they may carry identifiers)
    image: str = field(default="", repr=False, compare=False)

    @property
    def lesion_max_extent_mm(self) -> float:
        return float(max(self.lesion_extent_mm))

    def to_dict(self) -> dict[str, Any]:
        """The JSON record of plan.json's ``fingerprint.cases`` (samples left out)."""
        return {
            "case_id": self.case_id, "spacing_mm": _r(self.spacing_mm, 4), "size_vox": list(self.size_vox),
            "lesion_voxels": self.lesion_voxels, "lesion_volume_ml": _r(self.lesion_volume_ml, 4),
            "lesion_extent_mm": _r(self.lesion_extent_mm, 2),
            "lesion_hu_median": None if self.lesion_hu_median is None else _r(self.lesion_hu_median, 1),
            "bone_box_extent_mm": _r(self.bone_box_extent_mm, 2),
            "lesion_fraction_image": _r(self.lesion_fraction_image, 6),
            "lesion_fraction_bone_box": _r(self.lesion_fraction_bone_box, 6),
        }


def _r(value: Any, digits: int) -> Any:
    if isinstance(value, tuple | list | np.ndarray):
        return [_r(v, digits) for v in value]
    return round(float(value), digits)


def _sample(values: np.ndarray, n: int, case_id: str, salt: str) -> np.ndarray:
    """Up to ``n`` of ``values``, chosen by a generator seeded with the case id (same case: same sample)."""
    values = np.asarray(values, dtype=np.float32).ravel()
    if values.size <= n:
        return np.sort(values)
    rng = np.random.default_rng(zlib.crc32(f"{salt}:{case_id}".encode()))
    return np.sort(values[rng.choice(values.size, size=n, replace=False)])


def measure_case(case: Case, *, mask_label: int, grid_tolerance_mm: float, crop: CropSpec,
                 samples_per_case: int, single_thread: bool = False) -> CaseFingerprint:
    """Fingerprint one case from its raw CT (HU) and manual mask (label map, RTSTRUCT or SEG)."""
    import SimpleITK as sitk

    from bonemet.preprocessing.cohort import read_manual_case
    from bonemet.preprocessing.crop import bone_crop_box

    try:
        image, mask = read_manual_case(case, mask_label=mask_label, grid_tolerance_mm=grid_tolerance_mm,
                                       single_thread=single_thread)
        hu = sitk.GetArrayViewFromImage(image)  # (z, y, x)
        lesion = sitk.GetArrayViewFromImage(mask) > 0
        spacing = tuple(float(s) for s in image.GetSpacing())
        n_lesion = int(lesion.sum())
        if n_lesion:
            where = np.argwhere(lesion)
            extent_zyx = where.max(axis=0) - where.min(axis=0) + 1
            extent = tuple(float(n * s) for n, s in zip(extent_zyx[::-1], spacing, strict=True))
        else:
            extent = (0.0, 0.0, 0.0)
        # the bone region as the preprocessing crops it (from the CT alone), without a minimum size
        box = bone_crop_box(image, crop.bone_threshold_hu, crop.margin_mm, (1, 1, 1), crop.min_component_ml)
        (x0, y0, z0), (x1, y1, z1) = box.start, box.stop
        bone_hu = hu[z0:z1, y0:y1, x0:x1]
        lesion_in_box = int(lesion[z0:z1, y0:y1, x0:x1].sum())
        lesion_hu = hu[lesion]
        return CaseFingerprint(
            case_id=case.case_id, spacing_mm=spacing, size_vox=tuple(int(v) for v in image.GetSize()),
            lesion_voxels=n_lesion, lesion_volume_ml=volume_ml(n_lesion, spacing), lesion_extent_mm=extent,
            lesion_hu_median=float(np.median(lesion_hu)) if n_lesion else None,
            bone_box_extent_mm=tuple(float(n * s) for n, s in zip(box.size, spacing, strict=True)),
            lesion_fraction_image=n_lesion / float(hu.size),
            lesion_fraction_bone_box=lesion_in_box / float(max(1, bone_hu.size)),
            lesion_hu_sample=_sample(lesion_hu, samples_per_case, case.case_id, "lesion"),
            bone_hu_sample=_sample(bone_hu, samples_per_case, case.case_id, "bone"), image=str(case.image),
        )
    except Exception as exc:
        exc.add_note(f"while fingerprinting case '{case.case_id}' ({case.image})")
        raise


def _stats(values: Sequence[float], percentiles: Sequence[float] = (10.0, 50.0, 90.0)) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {}
    out = {"min": float(arr.min()), "max": float(arr.max()), "mean": float(arr.mean())}
    out.update({f"p{_pname(p)}": float(np.percentile(arr, p)) for p in percentiles})
    return out


def _pname(p: float) -> str:
    return f"{p:g}".replace(".", "_")


@dataclass(frozen=True)
class CohortFingerprint:
    """Every case's fingerprint, in manifest order, and the pooled distributions."""

    cases: tuple[CaseFingerprint, ...]

    @property
    def with_lesion(self) -> list[CaseFingerprint]:
        return [c for c in self.cases if c.lesion_voxels > 0]

    def spacings(self) -> np.ndarray:
        """(n_cases, 3) spacings, x y z mm."""
        return np.asarray([c.spacing_mm for c in self.cases], dtype=np.float64)

    def sizes_mm(self) -> np.ndarray:
        """(n_cases, 3) physical image extents, x y z mm."""
        return np.asarray([np.multiply(c.size_vox, c.spacing_mm) for c in self.cases], dtype=np.float64)

    def bone_box_mm(self) -> np.ndarray:
        """(n_cases, 3) bone-region extents, x y z mm."""
        return np.asarray([c.bone_box_extent_mm for c in self.cases], dtype=np.float64)

    def lesion_hu(self) -> np.ndarray:
        return np.concatenate([c.lesion_hu_sample for c in self.cases] or [np.zeros(0, np.float32)])

    def bone_hu(self) -> np.ndarray:
        return np.concatenate([c.bone_hu_sample for c in self.cases] or [np.zeros(0, np.float32)])

    def summary(self) -> dict[str, Any]:
        """The pooled fingerprint for plan.json (rounded, so equal cohorts print equal files)."""
        spacing = self.spacings()
        lesions = self.with_lesion
        lesion_hu, bone_hu = self.lesion_hu(), self.bone_hu()

        def hu_percentiles(values: np.ndarray) -> dict[str, float]:
            if values.size == 0:
                return {}
            return {f"p{_pname(p)}": round(float(v), 1) for p, v in
                    zip(REPORTED_PERCENTILES, np.percentile(values, REPORTED_PERCENTILES), strict=True)}

        def per_axis(values: np.ndarray, digits: int) -> dict[str, dict[str, float]]:
            return {axis: {k: round(v, digits) for k, v in _stats(values[:, i]).items()}
                    for i, axis in enumerate("xyz")} if len(values) else {}

        sizes = np.asarray([c.size_vox for c in self.cases], dtype=np.float64)
        return {
            "n_cases": len(self.cases),
            "n_cases_with_lesion": len(lesions),
            "spacing_mm": per_axis(spacing, 4),
            "size_vox": per_axis(sizes, 1),
            "image_extent_mm": per_axis(self.sizes_mm(), 2),
            "bone_region_extent_mm": per_axis(self.bone_box_mm(), 2),
            "lesion_extent_mm": per_axis(np.asarray([c.lesion_extent_mm for c in lesions]), 2),
            "lesion_max_extent_mm": {k: round(v, 2) for k, v in
                                     _stats([c.lesion_max_extent_mm for c in lesions]).items()},
            "lesion_volume_ml": {k: round(v, 4) for k, v in _stats([c.lesion_volume_ml for c in lesions]).items()},
            "lesion_voxels": {k: round(v, 1) for k, v in _stats([c.lesion_voxels for c in lesions]).items()},
            "hu_lesion": hu_percentiles(lesion_hu),
            "hu_bone_region": hu_percentiles(bone_hu),
            "class_balance": {
                "lesion_fraction_image": {k: round(v, 6) for k, v in
                                          _stats([c.lesion_fraction_image for c in self.cases]).items()},
                "lesion_fraction_bone_region": {k: round(v, 6) for k, v in
                                                _stats([c.lesion_fraction_bone_box for c in self.cases]).items()},
            },
        }


def fingerprint_cohort(cases: Sequence[Case], *, mask_label: int, grid_tolerance_mm: float, crop: CropSpec,
                       samples_per_case: int, n_jobs: int, show_progress: bool = False) -> CohortFingerprint:
    """Fingerprint every case (``n_jobs`` processes, -1 every core); the result is in ``cases``' order.

    Args:
        cases: the manifest's cases (:func:`bonemet.data.manifest.read_manifest`).
        mask_label: lesion value of label-map masks (``data.mask_label``).
        grid_tolerance_mm: how far a mask's grid may differ from its CT's (``validate.grid_tolerance_mm``).
        crop: ``preprocess.crop``: the bone region is found as the preprocessing finds it.
        samples_per_case: HU values sampled per case and region (``plan.samples_per_case``).
        n_jobs: worker processes (``plan.n_jobs``).
    """
    jobs = resolve_jobs(n_jobs, len(cases))
    kwargs = {"mask_label": int(mask_label), "grid_tolerance_mm": grid_tolerance_mm, "crop": crop,
              "samples_per_case": int(samples_per_case)}
    log.info("fingerprinting %d cases with %d process(es)", len(cases), jobs)
    if jobs == 1:
        measured = [measure_case(c, **kwargs) for c in progress(cases, total=len(cases), desc="fingerprint",
                                                                 disable=not show_progress)]
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(measure_case, c, single_thread=True, **kwargs) for c in cases]
            try:
                measured = [f.result() for f in progress(futures, total=len(cases), desc="fingerprint",
                                                         disable=not show_progress)]
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    empty = [c.case_id for c in measured if c.lesion_voxels == 0]
    if empty:
        log.warning("%d case(s) have an empty lesion mask and do not count in the lesion statistics: %s",
                    len(empty), ", ".join(empty[:10]))
    return CohortFingerprint(tuple(measured))
