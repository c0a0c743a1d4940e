"""The fitted classification pipeline cut down to the columns its classifier uses, for serving.

A served request carries all 1316 PyRadiomics features, but the pipeline's selectors (ICC,
correlation filter, LASSO) keep about 15 of them, and every step before the classifier works
column by column (the scalers of ``select.scaler``). The same arithmetic on the selected columns
alone gives the same numbers: :func:`serving_model` slices each column-wise step's fitted
vectors to those columns, drops the selectors, and keeps the classifier and its calibration as
they are. Where a step mixes columns (PCA when ``select.pca.enabled``, ComBat harmonisation
across sites) or is unknown, nothing is cut: the served model runs the whole pipeline on every
feature column (``mode="full"``), which then must all be sent.

Either way the served model is checked at build time to give bit-for-bit the probabilities of
the full pipeline on a DataFrame of the same rows, for several batch sizes; a reduced variant
that does not is not used. Reduced models run on a Fortran-ordered ndarray (the layout pandas
hands scikit-learn, so multi-row products sum in the same order) without the feature-name checks
(``input="array"``), or, where a classifier insists on names, on a small DataFrame
(``input="frame"``).
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator

log = logging.getLogger(__name__)

#: Batch sizes the served model is checked on (and all rows).
CHECK_BATCHES = (1, 2, 3, 7, 20)


def decompose(model: Any) -> tuple[Any, Any, Any]:
    """``(transform, classifier, calibrator)`` of a fitted model.

    ``transform`` is the pipeline without its final step (None when there is none),
    ``classifier`` the final estimator and ``calibrator`` the
    :class:`~bonemet.modeling.calibration.CalibratedPipeline`'s (None for a bare pipeline).
    ``calibrator.transform(classifier.predict_proba(transform.transform(X))[:, 1])`` is the
    model's probability of label 1, computed exactly as ``model.predict_proba(X)`` does.
    """
    from sklearn.pipeline import Pipeline

    from bonemet.modeling.calibration import CalibratedPipeline

    calibrator = None
    if isinstance(model, CalibratedPipeline):
        calibrator, model = model.calibrator, model.pipeline
    if isinstance(model, Pipeline):
        transform = model[:-1] if len(model.steps) > 1 else None
        return transform, model.steps[-1][1], calibrator
    return None, model, calibrator


class ServingModel(BaseEstimator):
    """What the served classifier runs: checked values in, probability of label 1 out.

    Parameters:
        transform: fitted steps before the classifier (None when there are none).
        classifier: the fitted classifier.
        calibrator: its :class:`~bonemet.modeling.calibration.ScoreCalibrator`, or None.
        columns: the numeric feature columns it reads, in order.
        text_columns: text columns it reads too (``site`` for ComBat), after ``columns``.
        input: ``array`` (Fortran-ordered ndarray of ``columns``) or ``frame`` (DataFrame).
        mode: ``reduced`` (selected columns only) or ``full`` (the whole pipeline).
        engine: ``sklearn`` (the estimators' own methods) or ``direct`` (the same arithmetic
            without scikit-learn's per-call checks, :mod:`bonemet.modeling.direct`; ``array``
            input only, and only where it was bit-equal at build time).
    """

    def __init__(self, *, transform: Any, classifier: Any, calibrator: Any, columns: Sequence[str],
                 text_columns: Sequence[str], input: str, mode: str, engine: str = "sklearn") -> None:
        self.transform = transform
        self.classifier = classifier
        self.calibrator = calibrator
        self.columns = columns
        self.text_columns = text_columns
        self.input = input
        self.mode = mode
        self.engine = engine

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())  # object.__getstate__ hands out the live __dict__
        state.pop("_direct", None)  # a function built on first use: never stored
        return state

    def _direct_form(self) -> Any:
        """The :class:`~bonemet.modeling.direct.DirectForm`, built once; None when ``engine`` is ``sklearn``
        (and for models logged before the engine existed)."""
        if getattr(self, "engine", "sklearn") != "direct":
            return None
        form = self.__dict__.get("_direct")
        if form is None:
            from bonemet.modeling.direct import compile_direct

            form = self.__dict__["_direct"] = compile_direct(self.transform, self.classifier, self.calibrator)
        return form

    def _input(self, values: np.ndarray, texts: Mapping[str, np.ndarray] | None) -> Any:
        if self.input == "array":
            return np.asfortranarray(values)
        frame = pd.DataFrame(np.asfortranarray(values), columns=list(self.columns))
        for name in self.text_columns:
            frame[name] = (texts or {})[name]
        return frame

    def classifier_input(self, values: np.ndarray, texts: Mapping[str, np.ndarray] | None = None) -> Any:
        """What the classifier sees for these rows: the output of the steps before it."""
        X = self._input(values, texts)
        direct = self._direct_form()
        if direct is not None:
            return direct.classifier_input(X)
        return X if self.transform is None else self.transform.transform(X)

    def proba_of(self, Z: Any) -> np.ndarray:
        """Probability of label 1 from the classifier's input ``Z`` (see :meth:`classifier_input`)."""
        direct = self._direct_form()
        if direct is not None:
            return direct.proba_of(Z)
        p = self.classifier.predict_proba(Z)[:, 1]
        return p if self.calibrator is None else self.calibrator.transform(p)

    def predict_values(self, values: np.ndarray, texts: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """Probability of label 1 for ``values`` (``(n, len(columns))`` float64)."""
        return self.proba_of(self.classifier_input(values, texts))


@dataclass(frozen=True)
class ServingPlan:
    """The served model and how it was obtained (recorded with the registered model)."""

    model: ServingModel
    #: why the pipeline was (or was not) cut down
    reason: str

    @property
    def selected(self) -> list[str]:
        return list(self.model.columns) if self.model.mode == "reduced" else []


def _columnwise_slicers() -> dict[type, Any]:
    from sklearn.preprocessing import PowerTransformer, QuantileTransformer, StandardScaler

    def standard(step: Any, idx: list[int]) -> None:
        for name in ("mean_", "var_", "scale_"):
            if getattr(step, name, None) is not None:
                setattr(step, name, getattr(step, name)[idx].copy())
        if np.ndim(getattr(step, "n_samples_seen_", 0)):
            step.n_samples_seen_ = step.n_samples_seen_[idx].copy()

    def power(step: Any, idx: list[int]) -> None:
        step.lambdas_ = step.lambdas_[idx].copy()
        if getattr(step, "_scaler", None) is not None:
            standard(step._scaler, idx)
            step._scaler.n_features_in_ = len(idx)
            if hasattr(step._scaler, "feature_names_in_"):
                del step._scaler.feature_names_in_

    def quantile(step: Any, idx: list[int]) -> None:
        step.quantiles_ = step.quantiles_[:, idx].copy()

    return {StandardScaler: standard, PowerTransformer: power, QuantileTransformer: quantile}


def _reduce(transform: Any, feature_names: Sequence[str]) -> tuple[list[Any] | None, list[str], str]:
    """The column-wise steps sliced to the selected columns, those columns, and the reason.

    Returns ``(None, [], reason)`` when a step mixes columns, is unknown or was fitted without
    column names.
    """
    from sklearn.feature_selection import SelectorMixin

    slicers = _columnwise_slicers()
    current = list(feature_names)
    columnwise: list[tuple[str, Any, list[str]]] = []
    for name, step in transform.steps:
        if step is None or step == "passthrough":
            continue
        names_in = getattr(step, "feature_names_in_", None)
        if names_in is None:
            return None, [], f"step '{name}' was fitted without column names"
        names_in = [str(n) for n in names_in]
        if isinstance(step, SelectorMixin):
            kept = [n for n, keep in zip(names_in, step.get_support(), strict=True) if keep]
            outside = [n for n in kept if n not in set(current)]
            if outside:
                return None, [], f"selector '{name}' keeps columns a served row does not hold ({outside[:3]})"
            current = kept
        elif type(step) in slicers:
            if names_in != current:
                return None, [], f"step '{name}' was fitted on other columns than it receives"
            columnwise.append((name, step, current))
        else:
            return None, [], f"step '{name}' ({type(step).__name__}) is not column-wise"
    sliced = []
    for name, step, names in columnwise:
        position = {n: i for i, n in enumerate(names)}
        idx = [position[n] for n in current]
        new = copy.deepcopy(step)
        slicers[type(step)](new, idx)
        new.n_features_in_ = len(idx)
        new.feature_names_in_ = np.asarray(current, dtype=object)
        sliced.append((name, new))
    return sliced, current, f"column-wise steps cut to the {len(current)} selected columns"


def _without_names(estimator: Any) -> Any:
    """A copy that takes plain ndarrays: scikit-learn's feature-name checks removed, default output."""
    est = copy.deepcopy(estimator)
    if hasattr(est, "set_output"):
        est.set_output(transform="default")
    seen: set[int] = set()

    def strip(obj: Any) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, list | tuple):
            for item in obj:
                strip(item)
        elif isinstance(obj, dict):
            for item in obj.values():
                strip(item)
        elif isinstance(obj, BaseEstimator) or hasattr(obj, "estimator"):
            attributes = vars(obj)
            attributes.pop("feature_names_in_", None)
            for item in attributes.values():
                strip(item)

    strip(est)
    return est


def _equal_on(served: ServingModel, model: Any, rows: pd.DataFrame, text_columns: Sequence[str]) -> bool:
    """Does ``served`` give bit-for-bit ``model.predict_proba(rows)`` for every checked batch size?"""
    sizes = sorted({n for n in CHECK_BATCHES if n <= len(rows)} | {len(rows)})
    texts_all = {c: rows[c].astype(str).to_numpy() for c in text_columns}
    values_all = rows[list(served.columns)].to_numpy(dtype=np.float64)
    for n in sizes:
        expected = model.predict_proba(rows.iloc[:n])[:, 1]
        got = served.predict_values(values_all[:n], {c: v[:n] for c, v in texts_all.items()})
        if not np.array_equal(np.asarray(got), np.asarray(expected)):
            return False
    return True


def _with_direct(served: ServingModel, model: Any, rows: pd.DataFrame) -> tuple[ServingModel, str]:
    """``served`` with ``engine="direct"`` when that form exists and is bit-equal on ``rows``, else as it is;
    and a few words on which engine it runs."""
    from bonemet.modeling.direct import NotDirect

    if served.input != "array":
        return served, "scikit-learn engine"
    candidate = copy.copy(served)
    candidate.engine = "direct"
    try:
        if _equal_on(candidate, model, rows, ()):
            return candidate, "direct engine (no per-call checks)"
        why = "not bit-equal"
    except NotDirect as exc:
        why = f"not covered: {exc}"
    log.info("direct engine not used: %s", why)
    return served, f"scikit-learn engine (direct {why})"


def serving_model(model: Any, feature_names: Sequence[str], check_rows: pd.DataFrame, *,
                  text_columns: Sequence[str] = ()) -> ServingPlan:
    """The fastest exact served form of a fitted ``model``.

    Args:
        model: the fitted pipeline (a :class:`~bonemet.modeling.calibration.CalibratedPipeline`
            or a scikit-learn Pipeline / estimator) taking a DataFrame of ``feature_names`` (and
            ``text_columns``).
        feature_names: the feature columns it was trained on, in order.
        check_rows: feature rows (e.g. the training table) the served form is checked on.
        text_columns: text columns the pipeline reads (``site`` for ComBat): the model is then
            served whole.

    Raises:
        AssertionError: even the whole pipeline, fed the checked values, does not reproduce its
            own probabilities (a bug, never served).
    """
    names = list(feature_names)
    rows = check_rows.loc[:, [*names, *text_columns]].reset_index(drop=True)
    rows = rows.astype({c: np.float64 for c in names})
    transform, classifier, calibrator = decompose(model)
    reason = "no selection steps to cut"
    if text_columns:
        reason = f"the pipeline reads the text column(s) {', '.join(text_columns)}"
    elif transform is not None:
        sliced, selected, reason = _reduce(transform, names)
        if sliced is not None:
            from sklearn.pipeline import Pipeline

            reduced_transform = Pipeline(sliced).set_output(transform="pandas") if sliced else None
            for input_kind in ("array", "frame"):
                try:
                    if input_kind == "array":
                        served = ServingModel(
                            transform=None if reduced_transform is None else _without_names(reduced_transform),
                            classifier=_without_names(classifier), calibrator=calibrator, columns=selected,
                            text_columns=(), input="array", mode="reduced")
                    else:
                        served = ServingModel(transform=reduced_transform, classifier=classifier,
                                              calibrator=calibrator, columns=selected, text_columns=(),
                                              input="frame", mode="reduced")
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        equal = _equal_on(served, model, rows, ())
                    named = [str(w.message) for w in caught if "feature names" in str(w.message)]
                    if equal and not named:
                        served, engine = _with_direct(served, model, rows)
                        return ServingPlan(served, f"{reason}; input {input_kind}, {engine}, bit-equal to the full "
                                                   f"pipeline")
                    # a warning per request about missing names would flood the server log
                    why = named[0] if named else "not bit-equal to the full pipeline"
                except (ValueError, TypeError, AttributeError, KeyError) as exc:  # e.g. a classifier needing names
                    why = f"{type(exc).__name__}: {exc}"
                log.info("reduced serving model with %s input refused: %s", input_kind, why)
            reason = f"the reduced pipeline was not bit-equal to the full one ({why})"
    full = ServingModel(transform=transform, classifier=classifier, calibrator=calibrator, columns=names,
                        text_columns=list(text_columns), input="frame", mode="full")
    if not _equal_on(full, model, rows, text_columns):
        raise AssertionError("the served pipeline does not reproduce the fitted pipeline's probabilities "
                             "on its own training rows")
    return ServingPlan(full, f"whole pipeline on all {len(names)} features: {reason}")
