"""The domain of a classifier's training cases, and whether a new case lies in it.

A probability is only as good as the resemblance of the case to the cases the model learnt
from. When a classifier is trained, :class:`TrainingDomain` records

* the ranges of the training CTs' voxel spacing (finest and coarsest axis, mm) and intensities
  (lowest and highest voxel, HU), as the validate stage measured them;
* the range of the training lesions' volume (mL, from the PyRadiomics shape feature
  ``original_shape_VoxelVolume``, which every served row carries);
* the distribution of the features the classifier reads (the pipeline's selected features, as
  the classifier sees them): a Mahalanobis distance (Ledoit-Wolf covariance of the standardised
  features) or an isolation forest (``train.domain.method``). Its threshold is calibrated by
  cross-validation on the training folds: each training case is scored by a detector fitted on
  the other folds, and the threshold is the smallest score that flags at most
  ``train.domain.max_flag_rate`` of those out-of-fold scores.

A new case is out of domain when its features lie beyond that threshold, or a measured quantity
lies outside the training range widened by a margin (``size_margin`` as a fraction of the
bound for spacing and volume, ``hu_margin`` in HU for intensities). Every answer says
``in_domain`` and, when false, the reasons. The served model judges the features and the lesion
volume; ``bonemet predict`` also has the CT, and judges its spacing and intensities.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.base import BaseEstimator

if TYPE_CHECKING:  # pragma: no cover
    from bonemet.config import DomainSpec

DOMAIN_METHODS = ("mahalanobis", "isolation_forest")
#: The PyRadiomics shape feature the lesion volume is read from (mm^3).
VOLUME_FEATURE = "original_shape_VoxelVolume"
#: Measured quantities of a CT, as the validate stage names them, with their unit.
IMAGE_QUANTITIES = {"spacing_min_mm": "mm", "spacing_max_mm": "mm", "hu_min": "HU", "hu_max": "HU"}
#: Per-model file of the train stage's output folder (``models/<model>.domain.skops``).
DOMAIN_SUFFIX = ".domain.skops"
_LABELS = {"spacing_min_mm": "finest voxel spacing", "spacing_max_mm": "coarsest voxel spacing",
           "hu_min": "lowest intensity", "hu_max": "highest intensity", "lesion_volume_ml": "lesion volume"}


def domain_file(model: str) -> str:
    """File name of ``model``'s training domain in the train stage's output folder."""
    return f"{model}{DOMAIN_SUFFIX}"


def image_measures(image: Any) -> dict[str, float]:
    """The CT's finest and coarsest voxel spacing (mm) and lowest and highest voxel (HU), measured
    as the validate stage measures its cases."""
    import SimpleITK as sitk

    spacing = image.GetSpacing()
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(image)
    return {"spacing_min_mm": float(min(spacing)), "spacing_max_mm": float(max(spacing)),
            "hu_min": float(stats.GetMinimum()), "hu_max": float(stats.GetMaximum())}


def report_measures(report: Mapping[str, Any], case_ids: Sequence[str]) -> dict[str, list[float]]:
    """The image quantities of ``case_ids`` from the validate stage's ``report.json``.

    Cases the report does not measure (or measures as null) are left out of each quantity.
    """
    by_case = {str(m.get("case_id")): m for m in report.get("measurements", [])}
    out: dict[str, list[float]] = {}
    for quantity in IMAGE_QUANTITIES:
        values = [by_case[c].get(quantity) for c in case_ids if c in by_case]
        out[quantity] = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return out


class TrainingDomain(BaseEstimator):
    """Where the training cases lie: measured ranges and the classifier's feature distribution.

    Parameters:
        method: ``mahalanobis`` (squared distance under a Ledoit-Wolf covariance of the
            standardised features: cheap, one matrix product per row) or ``isolation_forest``.
        max_flag_rate: the share of training cases, scored out of fold, the threshold may flag.
        n_estimators: trees of the isolation forest.
        size_margin: spacing and lesion volume may lie this fraction beyond the training range
            (``lo / (1 + m)`` to ``hi * (1 + m)``).
        hu_margin: intensities may lie this many HU beyond the training range.
        random_state: seeds the isolation forest.

    Attributes:
        columns_: the names of the classifier's input columns.
        loc_, scale_: per-column mean and standard deviation of the training features.
        detector_: the fitted LedoitWolf or IsolationForest (on all training cases).
        threshold_: scores above it are out of domain.
        oof_flag_rate_: share of training cases flagged out of fold (at most ``max_flag_rate``).
        in_sample_flag_rate_: share flagged by the final detector (fitted on them all).
        ranges_: ``{quantity: [lo, hi]}`` over the training cases (lesion volume in mL, image
            quantities as in :data:`IMAGE_QUANTITIES`); a quantity without measurements is absent.
        n_cases_: training cases.
    """

    def __init__(self, *, method: str, max_flag_rate: float, n_estimators: int, size_margin: float,
                 hu_margin: float, random_state: int) -> None:
        self.method = method
        self.max_flag_rate = max_flag_rate
        self.n_estimators = n_estimators
        self.size_margin = size_margin
        self.hu_margin = hu_margin
        self.random_state = random_state

    # --- fitting ----------------------------------------------------------------------------
    def _detector(self) -> Any:
        if self.method == "mahalanobis":
            from sklearn.covariance import LedoitWolf

            return LedoitWolf()
        from sklearn.ensemble import IsolationForest

        return IsolationForest(n_estimators=self.n_estimators, random_state=self.random_state)

    def _score_with(self, detector: Any, standardised: np.ndarray) -> np.ndarray:
        if self.method == "mahalanobis":
            # (x - mu)' P (x - mu), as LedoitWolf.mahalanobis, without its input validation (~1 ms a call)
            diff = standardised - detector.location_
            return np.einsum("ij,jk,ik->i", diff, detector.precision_, diff)
        return -np.asarray(detector.score_samples(standardised), dtype=np.float64)

    def fit(self, Z: Any, folds: Sequence[int], *, columns: Sequence[str],
            volumes_ml: Sequence[float] | None = None,
            images: Mapping[str, Sequence[float]] | None = None) -> TrainingDomain:
        """Fit on the classifier's input of the training cases.

        Args:
            Z: ``(n_cases, n_columns)`` what the classifier sees for each training case.
            folds: each case's cross-validation fold (the training set's ``train_folds``).
            columns: names of ``Z``'s columns.
            volumes_ml: each training lesion's volume (mL); None: no volume range.
            images: ``{quantity: values}`` of the training CTs (:func:`report_measures`); None:
                no image ranges.

        Raises:
            ValueError: an unknown method, a rate outside (0, 1), fewer than two folds, or
                non-finite features.
        """
        if self.method not in DOMAIN_METHODS:
            raise ValueError(f"domain method must be one of {DOMAIN_METHODS}; found {self.method!r}")
        if not 0.0 < float(self.max_flag_rate) < 1.0:
            raise ValueError(f"max_flag_rate must lie in (0, 1); found {self.max_flag_rate}")
        X = np.asarray(Z, dtype=np.float64)
        folds = np.asarray(folds)
        if X.ndim != 2 or len(folds) != len(X):
            raise ValueError(f"expected one fold per row of a 2-D feature matrix; found {X.shape} and {len(folds)}")
        if len(np.unique(folds)) < 2:
            raise ValueError("the domain's threshold is calibrated out of fold: give at least two folds")
        if not np.isfinite(X).all():
            raise ValueError("non-finite values in the training features")
        self.columns_ = [str(c) for c in columns]
        self.loc_ = X.mean(axis=0)
        scale = X.std(axis=0)
        self.scale_ = np.where(scale > 0, scale, 1.0)
        standardised = (X - self.loc_) / self.scale_
        oof = np.empty(len(X))
        for fold in np.unique(folds):
            held = folds == fold
            detector = self._detector().fit(standardised[~held])
            oof[held] = self._score_with(detector, standardised[held])
        self.threshold_ = float(np.quantile(oof, 1.0 - float(self.max_flag_rate), method="higher"))
        self.oof_flag_rate_ = float(np.mean(oof > self.threshold_))
        self.detector_ = self._detector().fit(standardised)
        self.in_sample_flag_rate_ = float(np.mean(self._score_with(self.detector_, standardised) > self.threshold_))
        self.n_cases_ = len(X)
        ranges: dict[str, list[float]] = {}
        if volumes_ml is not None and len(volumes_ml):
            ranges["lesion_volume_ml"] = [float(np.min(volumes_ml)), float(np.max(volumes_ml))]
        for quantity, values in (images or {}).items():
            if quantity in IMAGE_QUANTITIES and len(values):
                ranges[quantity] = [float(np.min(values)), float(np.max(values))]
        self.ranges_ = ranges
        return self

    # --- judging ----------------------------------------------------------------------------
    def scores(self, Z: Any) -> np.ndarray:
        """Out-of-domain score per row (higher: further from the training cases)."""
        X = np.asarray(Z, dtype=np.float64)
        return self._score_with(self.detector_, (X - self.loc_) / self.scale_)

    def allowed(self, quantity: str) -> tuple[float, float] | None:
        """The accepted interval of ``quantity`` (training range and margin), None when unrecorded."""
        if quantity not in self.ranges_:
            return None
        lo, hi = self.ranges_[quantity]
        if IMAGE_QUANTITIES.get(quantity) == "HU":
            return lo - float(self.hu_margin), hi + float(self.hu_margin)
        factor = 1.0 + float(self.size_margin)
        return lo / factor, hi * factor

    def _range_reason(self, quantity: str, value: float) -> str | None:
        bounds = self.allowed(quantity)
        if bounds is None or bounds[0] <= value <= bounds[1]:
            return None
        unit = "mL" if quantity == "lesion_volume_ml" else IMAGE_QUANTITIES[quantity]
        lo, hi = self.ranges_[quantity]
        side = "below" if value < bounds[0] else "above"
        return (f"{_LABELS[quantity]} {value:.4g} {unit} is {side} the training cases' {lo:.4g} to {hi:.4g} {unit}")

    def feature_reasons(self, Z: Any, volumes_ml: Sequence[float] | None = None) -> list[list[str]]:
        """Per row, why it is out of domain (an empty list when it is in): features, lesion volume."""
        out: list[list[str]] = []
        scores = self.scores(Z)
        what = "squared Mahalanobis distance" if self.method == "mahalanobis" else "isolation-forest score"
        for i, score in enumerate(scores):
            reasons = []
            if score > self.threshold_:
                reasons.append(f"the {len(self.columns_)} features the classifier reads lie far from the training "
                               f"cases ({what} {score:.3g} > {self.threshold_:.3g}, which flags "
                               f"{100 * self.oof_flag_rate_:.0f} % of training cases out of fold)")
            if volumes_ml is not None:
                reason = self._range_reason("lesion_volume_ml", float(volumes_ml[i]))
                if reason:
                    reasons.append(reason)
            out.append(reasons)
        return out

    def image_reasons(self, measures: Mapping[str, float]) -> list[str]:
        """Why a CT (its :func:`image_measures`) is out of domain; empty when it is in."""
        return [r for q in IMAGE_QUANTITIES if q in measures
                for r in [self._range_reason(q, float(measures[q]))] if r]

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (recorded with the registered model)."""
        return {"method": self.method, "max_flag_rate": float(self.max_flag_rate),
                "threshold": self.threshold_, "oof_flag_rate": self.oof_flag_rate_,
                "in_sample_flag_rate": self.in_sample_flag_rate_, "n_cases": self.n_cases_,
                "columns": list(self.columns_), "ranges": {k: list(v) for k, v in self.ranges_.items()},
                "allowed": {k: list(self.allowed(k) or ()) for k in self.ranges_},
                "size_margin": float(self.size_margin), "hu_margin": float(self.hu_margin)}


def fit_training_domain(model: Any, X: Any, folds: Sequence[int], spec: DomainSpec, *, seed: int,
                        images: Mapping[str, Sequence[float]] | None = None) -> TrainingDomain:
    """The domain of ``model``'s training cases.

    Args:
        model: the fitted pipeline (see :func:`bonemet.modeling.reduction.decompose`).
        X: its training rows as a served row holds them (the feature columns, and ``site`` when
            the pipeline harmonises per site).
        folds: each row's cross-validation fold.
        spec: the ``train.domain`` params.
        images: the training CTs' measured quantities (:func:`report_measures`), or None.
    """
    from bonemet.modeling.reduction import decompose

    transform, _, _ = decompose(model)
    Z = X if transform is None else transform.transform(X)
    columns = [str(c) for c in Z.columns] if hasattr(Z, "columns") else [f"x{i}" for i in range(np.shape(Z)[1])]
    volumes = None
    if VOLUME_FEATURE in getattr(X, "columns", ()):
        volumes = np.asarray(X[VOLUME_FEATURE], dtype=np.float64) / 1000.0  # mm^3 -> mL
    domain = TrainingDomain(method=spec.method, max_flag_rate=spec.max_flag_rate, n_estimators=spec.n_estimators,
                            size_margin=spec.size_margin, hu_margin=spec.hu_margin, random_state=seed)
    return domain.fit(np.asarray(Z, dtype=np.float64), folds, columns=columns, volumes_ml=volumes, images=images)


def case_domain(answer: Mapping[str, Any], domain: TrainingDomain | None, image: Any) -> dict[str, Any]:
    """``in_domain`` and ``domain_reasons`` of one CT's answer: the classifier's own verdict on
    its features and lesion volume (``answer``'s ``domain_reasons``), and the CT's spacing and
    intensities against ``domain`` (skipped when None)."""
    given = answer.get("domain_reasons")
    reasons = [] if given is None else [str(r) for r in given]
    if domain is not None:
        reasons += domain.image_reasons(image_measures(image))
    return {"in_domain": not reasons, "domain_reasons": reasons}
