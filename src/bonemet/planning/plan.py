"""The plan: every ``auto`` setting chosen from the cohort's fingerprint, within the profile's budgets.

What is planned (axes x, y, z as SimpleITK for spacings and preprocess sizes; ``segment.roi_size``
is D, H, W = z, y, x):

* **Target spacing** (``preprocess.target_spacing_mm``): the median spacing per axis; for an
  anisotropic cohort (nnU-Net's rule: the coarsest median spacing more than
  ``plan.anisotropy_threshold`` times the finest, and that axis with that many times fewer
  voxels) the coarse axis gets the ``plan.lowres_axis_percentile``-th percentile of its spacings
  (never finer than the other axes). Then, so that a typical lesion and its context fit in the
  profile's crop budget (``segment.plan.max_crop_voxels``), the finest axes are coarsened first
  (a common floor raised until the crop fits); the voxels the crop has to spare after rounding
  up to the network's divisor buy resolution back, down to ``plan.finest_spacing_percentile``.
* **Crop** (``segment.roi_size`` and ``preprocess.crop.min_size_vox``): the field of view
  ``plan.context_factor`` x the ``plan.lesion_extent_percentile``-th percentile of the lesions'
  largest extent (mm) on every axis, in voxels of the planned spacing, rounded up to the
  network's divisor, then grown one divisor step at a time towards the median bone region
  while the budget allows.
* **HU window** (``preprocess.hu_window``): the ``plan.intensity_percentiles`` of the lesion
  voxels' HU (nnU-Net's foreground clipping), widened where needed so that the bone threshold
  of the crop (``preprocess.crop.bone_threshold_hu``) lies inside.
* **Batch size** (``segment.train.batch_size``): as many cases per step (each giving
  ``segment.train.num_samples`` crops) as ``segment.plan.memory_mb`` holds, at most
  ``segment.plan.max_batch_size``: the activations of one crop are counted on torch's meta device
  (no memory, no compute) and doubled for the backward pass, plus weights, gradients and momentum.
* **Step budget** (``segment.train.max_steps``): the profile's training compute per fold
  (``segment.plan.train_megavoxels``, millions of crop voxels through the network) over the voxels
  of one step (batch x crops per case x crop voxels). A count of steps, not seconds: no clock or
  machine changes it. The details give the epochs it makes for a fold's estimated training cases.

Explicit params values are kept and the rest planned around them (an explicit spacing: the crop
is planned at it). Deterministic: the same fingerprint and inputs give the same plan.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from bonemet.config import AUTO, PLANNED_KEYS, setting
from bonemet.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from bonemet.config import Params, PlanSpec, SegPlanSpec
    from bonemet.planning.fingerprint import CaseFingerprint, CohortFingerprint

log = logging.getLogger(__name__)

#: plan.json's layout version
PLAN_SCHEMA = 2
#: a network whose divisor the plan cannot ask (``segment.model: external``): crops in steps of 8
EXTERNAL_DIVISOR = 8
_SPACING_DIGITS = 4


class NonCTIntensityError(UserError, ValueError):
    """Lesion intensities outside any CT-plausible HU range: not a CT in HU."""


class PlanError(UserError, ValueError):
    """The cohort cannot be planned (e.g. no case has a lesion)."""


def _json(value: Any) -> Any:
    """Tuples as lists (plan.json and the comparisons of inputs read back from it)."""
    if isinstance(value, tuple | list):
        return [_json(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class PlanInputs:
    """Everything the plan depends on besides the fingerprint (all from params)."""

    spec: PlanSpec
    budgets: SegPlanSpec
    profile: str
    network: str
    network_kwargs: dict[str, Any]
    num_samples: int
    bone_threshold_hu: float
    #: folds of the segmentation cross-validation and the share of a fold's training cases held out for
    #: validation: the training cases a fold's epoch steps over (the step budget's epochs)
    n_folds: int
    val_fraction: float
    max_epochs: int
    #: planned key -> its explicit params value (a key absent here is ``auto``)
    explicit: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_params(cls, params: Params) -> PlanInputs:
        seg = params.segment
        explicit = {k: _json(setting(params, k)) for k in PLANNED_KEYS if setting(params, k) != AUTO}
        # the network's keyword arguments as segmentation.networks.network_kwargs gives them (without torch)
        kwargs = seg.networks.model_dump(mode="python")[seg.model] if seg.model != "external" else {}
        return cls(spec=params.plan, budgets=seg.plan, profile=seg.profile, network=seg.model,
                   network_kwargs=_json(kwargs), num_samples=seg.train.num_samples,
                   bone_threshold_hu=float(params.preprocess.crop.bone_threshold_hu),
                   n_folds=params.split.n_folds, val_fraction=float(seg.val_fraction),
                   max_epochs=seg.train.max_epochs, explicit=explicit)

    def to_dict(self) -> dict[str, Any]:
        """What plan.json records as ``inputs`` (the stages compare it with their params)."""
        return _json({
            "plan": self.spec.model_dump(mode="json", exclude={"out", "n_jobs"}),
            "budgets": self.budgets.model_dump(mode="json"), "profile": self.profile, "network": self.network,
            "network_kwargs": self.network_kwargs, "num_samples": self.num_samples,
            "bone_threshold_hu": self.bone_threshold_hu, "n_folds": self.n_folds, "val_fraction": self.val_fraction,
            "max_epochs": self.max_epochs, "explicit": dict(sorted(self.explicit.items())),
        })


# --- checks ------------------------------------------------------------------------------------


def check_ct_intensities(fingerprint: CohortFingerprint, spec: PlanSpec) -> None:
    """:class:`NonCTIntensityError` naming the cases (and their image files) that are not CT in HU:
    a lesion median outside ``spec.lesion_hu_range``, or intensities in the bone region spanning
    less than ``spec.min_hu_spread`` HU (1st to 99th percentile; a normalised image)."""
    lo, hi = spec.lesion_hu_range
    problems = []
    for case in fingerprint.with_lesion:
        spread = (float(np.percentile(case.bone_hu_sample, 99) - np.percentile(case.bone_hu_sample, 1))
                  if case.bone_hu_sample.size else math.inf)
        if not lo <= float(case.lesion_hu_median) <= hi:
            problems.append(f"'{case.case_id}' ({case.image}): lesion median {case.lesion_hu_median:.4g}")
        elif spread < spec.min_hu_spread:
            problems.append(f"'{case.case_id}' ({case.image}): intensities span only {spread:.3g} around the bone")
    if not problems:
        return
    more = f" and {len(problems) - 10} more" if len(problems) > 10 else ""
    raise NonCTIntensityError(
        f"{len(problems)} of {len(fingerprint.with_lesion)} case(s) are not CT in Hounsfield units (lesion median "
        f"expected within plan.lesion_hu_range {[lo, hi]} HU, the bone region spanning at least plan.min_hu_spread "
        f"{spec.min_hu_spread:g} HU; outside any CT-plausible range): {'; '.join(problems[:10])}{more}. Rescale the "
        "images to HU (DICOM RescaleSlope/RescaleIntercept), remove non-CT images (MR, PET, normalised volumes) from "
        "the manifest, or widen plan.lesion_hu_range if these really are CT numbers")


# --- spacing and crop --------------------------------------------------------------------------


def _round_up(value: float, divisor: int) -> int:
    return max(divisor, int(divisor * math.ceil(value / divisor - 1e-9)))


def _crop_for(fov_mm: float, spacing: np.ndarray, divisor: int) -> np.ndarray:
    return np.asarray([_round_up(fov_mm / s, divisor) for s in spacing], dtype=int)


def base_spacing(fingerprint: CohortFingerprint, spec: PlanSpec) -> tuple[np.ndarray, bool]:
    """The median spacing per axis (x, y, z mm) with nnU-Net's anisotropy rule; and whether it applied."""
    spacings = fingerprint.spacings()
    median = np.median(spacings, axis=0)
    sizes = np.median(np.asarray([c.size_vox for c in fingerprint.cases], dtype=float), axis=0)
    worst = int(np.argmax(median))
    others = [i for i in range(3) if i != worst]
    anisotropic = (median[worst] > spec.anisotropy_threshold * median.min()
                   and sizes[worst] * spec.anisotropy_threshold < sizes[others].min())
    base = median.copy()
    if anisotropic:
        base[worst] = max(float(np.percentile(spacings[:, worst], spec.lowres_axis_percentile)),
                          float(median[others].max()))
    return base, bool(anisotropic)


def _fit_spacing(base: np.ndarray, fov_mm: float, budget: int, divisor: int) -> np.ndarray:
    """``base`` with its finest axes coarsened first (a floor raised in 1 % steps) until the crop
    covering ``fov_mm`` fits ``budget`` voxels."""
    floor = float(base.min())
    for _ in range(2000):
        spacing = np.maximum(base, floor)
        if int(np.prod(_crop_for(fov_mm, spacing, divisor))) <= budget:
            return spacing
        floor *= 1.01
    raise PlanError(f"no spacing fits a {fov_mm:.0f} mm field of view into segment.plan.max_crop_voxels {budget}")


def _shrink_crop(crop: np.ndarray, budget: int, divisor: int) -> np.ndarray:
    """The largest axis cut one divisor step at a time until ``crop`` fits ``budget`` voxels."""
    crop = crop.copy()
    while int(np.prod(crop)) > budget and crop.max() > divisor:
        crop[int(np.argmax(crop))] -= divisor
    return crop


def _grow_crop(crop: np.ndarray, target: np.ndarray, budget: int, divisor: int) -> np.ndarray:
    """``crop`` grown one divisor step at a time (the axis furthest below ``target`` first) while it fits."""
    crop = crop.copy()
    while True:
        short = [i for i in range(3) if crop[i] < target[i]]
        order = sorted(short, key=lambda i: (-(target[i] / crop[i]), i))
        for i in order:
            trial = crop.copy()
            trial[i] += divisor
            if int(np.prod(trial)) <= budget:
                crop = trial
                break
        else:
            return crop


# --- memory ------------------------------------------------------------------------------------


def activation_mb(network: str, kwargs: Mapping[str, Any], roi_size: Sequence[int]) -> tuple[float, int]:
    """``(MB of the outputs of every leaf module for one crop in training mode, parameter count)``:
    measured on torch's meta device (shapes only) by :func:`bonemet.segmentation.networks.activation_mb`."""
    from bonemet.segmentation.networks import activation_mb as measured

    return measured(network, kwargs, roi_size)


def plan_batch(inputs: PlanInputs, roi_size: Sequence[int]) -> tuple[int, dict[str, Any], list[str]]:
    """The batch size within the memory budget; the estimate; warnings."""
    budgets = inputs.budgets
    if inputs.network == "external":
        return budgets.max_batch_size, {"note": "segment.model external: nothing is trained"}, []
    act, n_params = activation_mb(inputs.network, inputs.network_kwargs, roi_size)
    static = n_params * 4 * 3 / 2**20  # weights, gradients, momentum (float32)
    per_case = 2.0 * act * inputs.num_samples  # forward activations kept for backward, and their gradients
    fits = int((budgets.memory_mb - static) // per_case) if per_case > 0 else budgets.max_batch_size
    batch = max(1, min(budgets.max_batch_size, fits))
    warnings = []
    if fits < 1:
        warnings.append(f"one case's {inputs.num_samples} crop(s) of {list(roi_size)} voxels need about "
                        f"{static + per_case:.0f} MB with {inputs.network}, more than segment.plan.memory_mb "
                        f"{budgets.memory_mb:g}: batch size 1 (lower segment.plan.max_crop_voxels or raise memory_mb)")
    estimate = {"activation_mb_per_crop": round(act, 2), "static_mb": round(static, 2),
                "step_mb": round(static + per_case * batch, 1), "n_parameters": int(n_params)}
    return batch, estimate, warnings


def fold_training_cases(n_cases: int, n_folds: int, val_fraction: float) -> int:
    """The training cases of a typical fold: the cases outside it, less the validation hold-out
    (as :func:`bonemet.segmentation.cv.split_validation` draws it: at least one)."""
    outside = n_cases - math.ceil(n_cases / n_folds)
    if outside < 2 or val_fraction <= 0:
        return max(1, outside)
    return outside - min(outside - 1, max(1, int(round(val_fraction * outside))))


def plan_steps(inputs: PlanInputs, n_cases: int, roi_size: Sequence[int], batch: int,
               explicit: Mapping[str, Any]) -> tuple[int | None, dict[str, Any], list[str]]:
    """The step budget per fold (an explicit ``segment.train.max_steps`` kept; None: the epoch
    schedule, or no ``segment.plan.train_megavoxels`` to plan from), how it was derived (steps per
    epoch and epochs for a typical fold) and warnings.

    Raises:
        PlanError: the budget is less than one epoch of a typical fold.
    """
    megavoxels = inputs.budgets.train_megavoxels
    voxels_per_step = int(batch) * inputs.num_samples * int(np.prod(roi_size))
    key = "segment.train.max_steps"
    steps = explicit.get(key)
    if key not in explicit and megavoxels is not None:
        steps = max(1, int(round(megavoxels * 1e6 / voxels_per_step)))
    n_train = fold_training_cases(n_cases, inputs.n_folds, inputs.val_fraction)
    per_epoch = math.ceil(n_train / int(batch))
    details: dict[str, Any] = {"voxels_per_step": voxels_per_step, "fold_training_cases": n_train,
                               "steps_per_epoch": per_epoch}
    if steps is None:
        return None, details, []
    source = key if key in explicit else (
        f"segment.plan.train_megavoxels {megavoxels:g} (segment.train.max_steps auto)")
    if steps < per_epoch:
        raise PlanError(f"{source} gives {steps} optimiser steps per fold, less than one epoch ({per_epoch} steps of "
                        f"batch {batch} over a fold's {n_train} training cases): raise it")
    epochs = math.ceil(steps / per_epoch)
    details["epochs"] = min(epochs, inputs.max_epochs)
    warnings = []
    if epochs > inputs.max_epochs:
        warnings.append(f"{source} gives {steps} optimiser steps per fold, {epochs} epochs of {per_epoch} steps: more "
                        f"than segment.train.max_epochs {inputs.max_epochs}, so each fold stops after "
                        f"{inputs.max_epochs} epochs (raise max_epochs or lower the budget)")
    return steps, details, warnings


# --- the plan ----------------------------------------------------------------------------------


def _r(values: Any, digits: int = _SPACING_DIGITS) -> list[float]:
    return [round(float(v), digits) for v in values]


def _plan_values(fp: CohortFingerprint, inputs: PlanInputs, explicit: Mapping[str, Any],
                 divisor: int) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """The planned keys' values (explicit ones kept), the details of how, and warnings."""
    spec, budget = inputs.spec, inputs.budgets.max_crop_voxels
    warnings: list[str] = []
    lesions = fp.with_lesion
    extents = np.asarray([c.lesion_max_extent_mm for c in lesions])
    typical = float(np.percentile(extents, spec.lesion_extent_percentile))
    fov = spec.context_factor * typical
    base, anisotropic = base_spacing(fp, spec)
    finest = np.percentile(fp.spacings(), spec.finest_spacing_percentile, axis=0)
    roi_explicit = explicit.get("segment.roi_size")
    spacing_explicit = explicit.get("preprocess.target_spacing_mm")

    if spacing_explicit is not None:
        spacing = np.asarray(spacing_explicit, dtype=float)
    if roi_explicit is not None:
        crop = np.asarray(roi_explicit[::-1], dtype=int)  # D, H, W -> x, y, z
        if spacing_explicit is None:  # coarse enough that the field of view fits the given crop
            spacing = np.maximum(fov / crop, np.minimum(finest, base))
    else:
        if spacing_explicit is None:
            spacing = _fit_spacing(base, fov, budget, divisor)
        crop = _crop_for(fov, spacing, divisor)
        if int(np.prod(crop)) > budget:
            crop = _shrink_crop(crop, budget, divisor)
            warnings.append(f"the crop that covers a typical lesion and its context ({fov:.0f} mm) at the explicit "
                            f"preprocess.target_spacing_mm {_r(spacing)} exceeds segment.plan.max_crop_voxels "
                            f"{budget}: cut to {crop.tolist()} (x, y, z voxels)")
        if spacing_explicit is None:  # the voxels rounding left spare buy resolution back
            spacing = np.minimum(spacing, np.maximum(fov / crop, finest))
        bone = np.median(fp.bone_box_mm(), axis=0)
        crop = _grow_crop(crop, np.asarray([_round_up(b / s, divisor) for b, s in zip(bone, spacing, strict=True)]),
                          budget, divisor)

    # lesions too small for the grid: the plan refines the spacing (within the cohort's own) and
    # the crop follows within the budget, covering less context
    spacing, crop, small_warning = _refine_for_small_lesions(
        lesions, spacing, crop, spec=spec, finest=finest, fov=fov, budget=budget, divisor=divisor,
        refine_spacing=spacing_explicit is None, refit_crop=roi_explicit is None)
    if small_warning is not None:
        warnings.append(small_warning)

    values: dict[str, Any] = {
        "preprocess.target_spacing_mm": _r(spacing),
        "segment.roi_size": [int(v) for v in crop[::-1]],
        "preprocess.crop.min_size_vox": [int(v) for v in crop],
    }
    values.update({k: v for k, v in explicit.items() if k in values})
    if "preprocess.crop.min_size_vox" not in explicit:
        values["preprocess.crop.min_size_vox"] = list(values["segment.roi_size"])[::-1]

    values["preprocess.hu_window"] = explicit.get("preprocess.hu_window",
                                                  _hu_window(fp, spec, inputs.bone_threshold_hu))

    batch, memory, memory_warnings = plan_batch(inputs, values["segment.roi_size"])
    warnings += memory_warnings
    values["segment.train.batch_size"] = explicit.get("segment.train.batch_size", batch)
    steps, schedule, step_warnings = plan_steps(inputs, len(fp.cases), values["segment.roi_size"],
                                                values["segment.train.batch_size"], explicit)
    warnings += step_warnings
    values["segment.train.max_steps"] = steps
    details = {
        "typical_lesion_extent_mm": round(typical, 2), "field_of_view_mm": round(fov, 2),
        "base_spacing_mm": _r(base), "anisotropic_cohort": anisotropic, "divisor": divisor,
        "crop_mm": _r(np.asarray(values["segment.roi_size"][::-1]) * np.asarray(values["preprocess.target_spacing_mm"]),
                      1),
        "crop_voxels": int(np.prod(values["segment.roi_size"])), "memory": memory, "schedule": schedule,
    }
    return values, details, warnings


def _refine_for_small_lesions(lesions: Sequence[CaseFingerprint], spacing: np.ndarray, crop: np.ndarray, *, spec: PlanSpec,
                              finest: np.ndarray, fov: float, budget: int, divisor: int, refine_spacing: bool,
                              refit_crop: bool) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Lesions too small for the grid (fewer than ``plan.min_lesion_voxels`` across some axis):
    when the median lesion is that small too, the spacing is refined (within the cohort's
    ``finest``; unless explicit) and the crop follows within ``budget``, covering less context
    (unless explicit). The spacing, the crop (x, y, z voxels) and a warning naming the cases."""
    too_small = [c for c in lesions if min(np.asarray(c.lesion_extent_mm) / spacing) < spec.min_lesion_voxels]
    if not too_small:
        return spacing, crop, None
    names = ", ".join(c.case_id for c in too_small[:10]) + (f" and {len(too_small) - 10} more"
                                                              if len(too_small) > 10 else "")
    adapted = ""
    median_extent = np.median(np.asarray([c.lesion_extent_mm for c in lesions]), axis=0)
    needed = median_extent / spec.min_lesion_voxels
    refined = np.minimum(spacing, np.maximum(needed, finest))
    if refine_spacing and np.any(refined < spacing - 1e-9):
        spacing = refined
        if refit_crop:
            crop = _shrink_crop(_crop_for(fov, spacing, divisor), budget, divisor)
        adapted = (f"; the median lesion is that small too, so the spacing was refined to {_r(spacing)} mm and "
                   f"the crop adapted to {crop.tolist()} voxels (x, y, z), {_r(crop * spacing, 1)} mm")
    return spacing, crop, (f"{len(too_small)} case(s) have lesions fewer than plan.min_lesion_voxels "
                           f"{spec.min_lesion_voxels} voxels across on some axis of the {_r(spacing)} mm grid: "
                           f"{names}{adapted}")


def _hu_window(fp: CohortFingerprint, spec: PlanSpec, bone_threshold_hu: float) -> list[float]:
    """The HU window: the cohort's lesion HU percentiles (``plan.intensity_percentiles``), rounded
    outwards, widened to hold the bone threshold with a tenth of its width to spare (the crop and
    the inference's bone mask read the bone threshold in the window)."""
    lesion_hu = fp.lesion_hu()
    lo, hi = (float(v) for v in np.percentile(lesion_hu, spec.intensity_percentiles))
    lo, hi = math.floor(lo), math.ceil(hi)
    threshold = bone_threshold_hu
    if not lo < threshold < hi:
        width = hi - lo
        lo, hi = min(lo, math.floor(threshold - 0.1 * width)), max(hi, math.ceil(threshold + 0.1 * width))
    return [float(lo), float(hi)]


def _anisotropy_warning(fp: CohortFingerprint, spec: PlanSpec, values: Mapping[str, Any]) -> str | None:
    spacings = fp.spacings()
    ratio = spacings.max(axis=1) / spacings.min(axis=1)
    bad = [c for c, r in zip(fp.cases, ratio, strict=True) if r > spec.warn_anisotropy]
    if not bad:
        return None
    names = ", ".join(f"{c.case_id} ({'x'.join(f'{s:.3g}' for s in c.spacing_mm)} mm)" for c in bad[:10])
    more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
    return (f"{len(bad)} case(s) have voxels more than plan.warn_anisotropy {spec.warn_anisotropy:g} times longer on "
            f"one axis than another: {names}{more}; they are resampled to {values['preprocess.target_spacing_mm']} mm "
            f"and the crop adapted per axis to {values['preprocess.crop.min_size_vox']} voxels (x, y, z)")


def make_plan(fingerprint: CohortFingerprint, inputs: PlanInputs) -> dict[str, Any]:
    """The plan document (plan.json): every planned key's value and where it came from
    (``source``: ``plan`` or ``params``; ``planned``: what the plan alone would choose), how it
    was derived, warnings, the inputs and the fingerprint.

    Raises:
        NonCTIntensityError: lesion intensities outside ``plan.lesion_hu_range``.
        PlanError: no case has a lesion.
    """
    from bonemet.segmentation.networks import input_divisor

    if not fingerprint.with_lesion:
        raise PlanError(f"none of the {len(fingerprint.cases)} cases has a lesion in its manual mask: the plan sizes "
                        "the crop and the HU window from the lesions (check data.mask_label and the masks)")
    check_ct_intensities(fingerprint, inputs.spec)
    divisor = (EXTERNAL_DIVISOR if inputs.network == "external"
               else input_divisor(inputs.network, **inputs.network_kwargs))
    planned, _, _ = _plan_values(fingerprint, inputs, {}, divisor)
    values, details, warnings = _plan_values(fingerprint, inputs, inputs.explicit, divisor)
    anisotropy = _anisotropy_warning(fingerprint, inputs.spec, values)
    if anisotropy:
        warnings.insert(0, anisotropy)
    return {
        "schema": PLAN_SCHEMA,
        "values": {k: {"value": values[k], "source": "params" if k in inputs.explicit else "plan",
                       "planned": planned[k]} for k in PLANNED_KEYS},
        "details": details,
        "warnings": warnings,
        "inputs": inputs.to_dict(),
        "fingerprint": {**fingerprint.summary(), "cases": [c.to_dict() for c in fingerprint.cases]},
    }
