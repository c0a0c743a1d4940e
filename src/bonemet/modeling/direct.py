"""The served model's arithmetic without scikit-learn's per-call checks, bit for bit.

A served request is one row of about 15 checked float64 values, and scikit-learn spends most of
its time on that row checking it again: every ``transform``, ``decision_function`` and
``predict_proba`` validates its input (about 20 checks per request for a calibrated SVM, each
~0.05-0.1 ms), while the arithmetic itself takes microseconds. :func:`compile_direct` returns a
function that does the same arithmetic, in the same order and with the same libsvm call, for the
estimators the registered pipelines are built from:

* steps before the classifier: ``StandardScaler`` (others run their own ``transform``);
* classifiers: ``CalibratedClassifierCV`` (binary; sigmoid or isotonic) around ``SVC`` or
  ``LogisticRegression``, and binary ``LogisticRegression``;
* the pipeline's :class:`~bonemet.modeling.calibration.ScoreCalibrator`.

Anything else raises :class:`NotDirect` and the model is served through scikit-learn. The
served model uses the direct form only after it gave bit-for-bit the full pipeline's
probabilities at build time (:func:`bonemet.modeling.reduction.serving_model`); the input must
already be checked (finite float64, the model's columns: :class:`bonemet.serving.checks.FeatureContract`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import expit

Array = np.ndarray
Fn = Callable[[Array], Array]


class NotDirect(Exception):
    """The model holds an estimator the direct form does not cover (it is then served by scikit-learn)."""


@dataclass(frozen=True)
class DirectForm:
    """The served model's two halves (see :func:`bonemet.modeling.reduction.decompose`)."""

    #: values -> the classifier's input (the steps before it)
    classifier_input: Fn
    #: the classifier's input -> calibrated probability of label 1
    proba_of: Fn


def compile_direct(transform: Any, classifier: Any, calibrator: Any) -> DirectForm:
    """The direct form of ``calibrator.transform(classifier.predict_proba(transform.transform(values))[:, 1])``.

    Raises:
        NotDirect: an estimator the direct form does not cover.
    """
    proba, calibrate = _proba_fn(classifier), _calibrator_fn(calibrator)
    return DirectForm(classifier_input=_transform_fn(transform), proba_of=lambda Z: calibrate(proba(Z)))


def _transform_fn(transform: Any) -> Fn:
    if transform is None:
        return lambda X: X
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    estimators = [step for _, step in transform.steps] if isinstance(transform, Pipeline) else [transform]
    estimators = [s for s in estimators if s is not None and s != "passthrough"]
    fns = [_standard_scaler(s) if type(s) is StandardScaler else s.transform for s in estimators]

    def run(X: Array) -> Array:
        for fn in fns:
            X = fn(X)
        return X

    return run


def _standard_scaler(step: Any) -> Fn:
    """``StandardScaler.transform`` on a dense float64 array: a copy, less the mean, over the scale."""
    mean = step.mean_ if step.with_mean else None
    scale = step.scale_ if step.with_std else None

    def run(X: Array) -> Array:
        X = np.array(X, dtype=np.float64, copy=True)
        if mean is not None:
            X -= mean
        if scale is not None:
            X /= scale
        return X

    return run


def _proba_fn(classifier: Any) -> Fn:
    """Probability of the second class (label 1)."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import LogisticRegression

    if type(classifier) is LogisticRegression:
        return _logistic_proba(classifier)
    if type(classifier) is CalibratedClassifierCV:
        return _calibrated_cv_proba(classifier)
    raise NotDirect(f"classifier {type(classifier).__name__}")


def _binary(estimator: Any) -> None:
    if len(getattr(estimator, "classes_", ())) != 2:
        raise NotDirect(f"{type(estimator).__name__} is not a fitted binary classifier")


def _logistic_decision(model: Any) -> Fn:
    """``LinearClassifierMixin.decision_function`` (binary: one column of coefficients)."""
    _binary(model)
    coef_T, intercept = model.coef_.T, model.intercept_
    if coef_T.shape[1] != 1:
        raise NotDirect("logistic regression with more than one coefficient row")
    return lambda X: (X @ coef_T + intercept).reshape(-1)


def _logistic_proba(model: Any) -> Fn:
    decision = _logistic_decision(model)
    return lambda X: expit(decision(X))


def _svc_decision(svc: Any) -> Fn:
    """``SVC.decision_function`` of a binary dense SVC: the libsvm call scikit-learn makes, sign flipped."""
    from sklearn.svm import SVC
    from sklearn.svm import _libsvm as libsvm
    from sklearn.svm._base import LIBSVM_IMPL

    _binary(svc)
    if type(svc) is not SVC or svc._sparse or callable(svc.kernel) or svc.kernel == "precomputed":
        raise NotDirect("SVC that is sparse or has a callable/precomputed kernel")
    arguments = dict(svm_type=LIBSVM_IMPL.index(svc._impl), kernel=svc.kernel, degree=svc.degree,
                     cache_size=svc.cache_size, coef0=svc.coef0, gamma=svc._gamma)
    fitted = (svc.support_, svc.support_vectors_, svc._n_support, svc._dual_coef_, svc._intercept_,
              svc._probA, svc._probB)

    def run(X: Array) -> Array:
        X = np.ascontiguousarray(X, dtype=np.float64)
        return -libsvm.decision_function(X, *fitted, **arguments).ravel()

    return run


def _calibrated_cv_proba(model: Any) -> Fn:
    """``CalibratedClassifierCV.predict_proba[:, 1]``: the mean over its calibrated classifiers."""
    from sklearn.calibration import _SigmoidCalibration
    from sklearn.isotonic import IsotonicRegression
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    _binary(model)
    members = []
    for member in model.calibrated_classifiers_:
        estimator = member.estimator
        if list(estimator.classes_) != list(model.classes_) or member.method not in ("sigmoid", "isotonic"):
            raise NotDirect("calibrated classifier with other classes or calibration method")
        if type(estimator) is SVC:
            decision = _svc_decision(estimator)
        elif type(estimator) is LogisticRegression:
            decision = _logistic_decision(estimator)
        else:
            raise NotDirect(f"calibrated {type(estimator).__name__}")
        (calibrator,) = member.calibrators
        if type(calibrator) is _SigmoidCalibration:
            a, b = calibrator.a_, calibrator.b_
            calibrate = lambda T, a=a, b=b: expit(-(a * T + b))  # noqa: E731 - one per member
        elif type(calibrator) is IsotonicRegression:
            calibrate = calibrator.predict
        else:
            raise NotDirect(f"calibrator {type(calibrator).__name__}")
        members.append((decision, calibrate))

    def run(X: Array) -> Array:
        mean = np.zeros(X.shape[0])
        for decision, calibrate in members:
            p = np.asarray(calibrate(decision(X)), dtype=np.float64)
            p[(1.0 < p) & (p <= 1.0 + 1e-5)] = 1.0
            mean += p
        mean /= len(members)
        return mean

    return run


def _calibrator_fn(calibrator: Any) -> Fn:
    """:meth:`bonemet.modeling.calibration.ScoreCalibrator.transform`."""
    if calibrator is None:
        return lambda p: p
    from sklearn.linear_model import LogisticRegression

    from bonemet.modeling.calibration import logit

    model = calibrator.model_
    if model is None:
        return lambda p: np.asarray(p, dtype=np.float64)
    if calibrator.method == "sigmoid" and type(model) is LogisticRegression:
        proba = _logistic_proba(model)
        return lambda p: proba(logit(p)[:, None])
    if calibrator.method == "isotonic":
        return lambda p: np.asarray(model.predict(np.asarray(p, dtype=np.float64)), dtype=np.float64)
    raise NotDirect(f"score calibrator {calibrator.method}")
