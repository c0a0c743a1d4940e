"""One scikit-learn Pipeline from the raw feature row to the probability of breast origin.

``[ComBat] -> ICC filter -> correlation filter -> [z-score, PCA] -> scaler -> LASSO -> classifier``;
ComBat harmonisation across the manifest's sites (``select.harmonize``, off by default) then
needs the rows' ``site`` column (see :mod:`bonemet.selection.harmonize`); the scaler is
``StandardScaler`` (z-score, default), a Yeo-Johnson ``PowerTransformer`` or a normal-output
``QuantileTransformer`` (param ``select.scaler``): radiomic features are often heavy-tailed, and
LASSO and the linear classifiers treat a z-scored outlier as signal.
Every data-dependent step lives in this one Pipeline, so cross-validation and the test set
never leak into selection. The pipeline outputs pandas frames between steps (``set_output``)
so feature names survive to the LASSO step and to ``selected_features.json``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sklearn.pipeline import Pipeline

from bonemet.config import SCALERS
from bonemet.modeling.classifiers import build_classifier

if TYPE_CHECKING:  # pragma: no cover
    from bonemet.config import SelectSpec

#: Name of the classifier step; everything before it is the selection part.
CLASSIFIER_STEP = "clf"


def build_selection(select: SelectSpec, seed: int) -> list[tuple[str, Any]]:
    """The selection steps (unfitted) from the ``select`` params section."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    from bonemet.data.manifest import SITE_COLUMN
    from bonemet.selection import ComBatHarmonizer, CorrelationFilter, ICCFilter, LassoSelector

    steps: list[tuple[str, Any]] = []
    if select.harmonize.enabled:
        harmonize = select.harmonize
        steps.append(("harmonize", ComBatHarmonizer(site_column=SITE_COLUMN, parametric=harmonize.parametric,
                                                    mean_only=harmonize.mean_only)))
    if select.icc.enabled:
        icc = select.icc
        steps.append(("icc", ICCFilter(threshold=icc.threshold, icc_form=icc.form, paired_prefix=icc.paired_prefix,
                                       min_features=icc.min_features)))
    if select.correlation.enabled:
        steps.append(("correlation", CorrelationFilter(threshold=select.correlation.threshold)))
    if select.pca.enabled:
        # on z-scores (the correlation matrix): radiomic features span many orders of magnitude,
        # and on raw values the first components would just be the largest-valued features
        steps.append(("pca_scaler", StandardScaler()))
        steps.append(("pca", PCA(n_components=select.pca.n_components, random_state=seed)))
    steps.append(("scaler", build_scaler(select.scaler, seed)))
    lasso = select.lasso
    steps.append(("lasso", LassoSelector(alpha=lasso.alpha, cv=lasso.cv, n_alphas=lasso.n_alphas,
                                         max_features=lasso.max_features, max_iter=lasso.max_iter,
                                         random_state=seed, lambda_rule=lasso.lambda_rule)))
    return steps


def build_scaler(kind: str, seed: int) -> Any:
    """The unfitted scaling step: ``standard`` (z-score), ``yeo-johnson`` (power transform, then
    z-score) or ``quantile`` (rank-based map to a standard normal; robust to any tail)."""
    from sklearn.preprocessing import PowerTransformer, QuantileTransformer, StandardScaler

    if kind == "standard":
        return StandardScaler()
    if kind == "yeo-johnson":
        return PowerTransformer(method="yeo-johnson", standardize=True)
    if kind == "quantile":
        # sklearn caps n_quantiles at the rows of a smaller fit (with a warning)
        return QuantileTransformer(n_quantiles=100, output_distribution="normal", subsample=None, random_state=seed)
    raise ValueError(f"select.scaler must be one of {list(SCALERS)}; found {kind!r}")


def build_selection_pipeline(select: SelectSpec, seed: int) -> Pipeline:
    """The selection part alone (used to precompute per-fold selections during tuning)."""
    return Pipeline(build_selection(select, seed)).set_output(transform="pandas")


def build_pipeline(model_name: str, model_params: Mapping[str, Any], select: SelectSpec, seed: int) -> Pipeline:
    """The whole unfitted pipeline: selection steps then classifier ``model_name``."""
    steps = build_selection(select, seed)
    steps.append((CLASSIFIER_STEP, build_classifier(model_name, model_params, seed)))
    return Pipeline(steps).set_output(transform="pandas")
