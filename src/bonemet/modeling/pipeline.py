"""One scikit-learn Pipeline from the raw feature row to the probability of breast origin.

``ICC filter -> correlation filter -> [z-score, PCA] -> scaler -> LASSO -> classifier``; the scaler is
``StandardScaler`` (z-score, default), a Yeo-Johnson ``PowerTransformer`` or a normal-output
``QuantileTransformer`` (param ``select.scaler``): radiomic features are often heavy-tailed, and
LASSO and the linear classifiers treat a z-scored outlier as signal.
Every data-dependent step lives in this one Pipeline, so cross-validation and the test set
never leak into selection. The pipeline outputs pandas frames between steps (``set_output``)
so feature names survive to the LASSO step and to ``selected_features.json``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sklearn.pipeline import Pipeline

from bonemet.modeling.classifiers import build_classifier

#: Name of the classifier step; everything before it is the selection part.
CLASSIFIER_STEP = "clf"


def build_selection(select_params: Mapping[str, Any], seed: int) -> list[tuple[str, Any]]:
    """The selection steps (unfitted) from the ``select`` params section.

    Keys: ``icc.threshold``, ``icc.form``, ``icc.paired_prefix``, ``correlation.enabled``,
    ``correlation.threshold``, ``pca.enabled``, ``pca.n_components``, ``scaler`` (standard |
    yeo-johnson | quantile), ``lasso.alpha`` (null = CV), ``lasso.cv``, ``lasso.n_alphas``,
    ``lasso.max_features``, ``lasso.max_iter``.

    Raises:
        ValueError: an unknown ``scaler``.
    """
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    from bonemet.selection import CorrelationFilter, ICCFilter, LassoSelector

    icc = dict(select_params.get("icc", {}))
    corr = dict(select_params.get("correlation", {}))
    pca = dict(select_params.get("pca", {}))
    lasso = dict(select_params.get("lasso", {}))
    steps: list[tuple[str, Any]] = []
    if icc.get("enabled", True):
        steps.append(
            (
                "icc",
                ICCFilter(
                    threshold=float(icc.get("threshold", 0.9)),
                    icc_form=str(icc.get("form", "ICC(2,1)")),
                    paired_prefix=str(icc.get("paired_prefix", "paired__")),
                    min_features=int(icc.get("min_features", 1)),
                ),
            )
        )
    if corr.get("enabled", True):
        steps.append(("correlation", CorrelationFilter(threshold=float(corr.get("threshold", 0.95)))))
    if pca.get("enabled", False):
        # on z-scores (the correlation matrix): radiomic features span many orders of magnitude,
        # and on raw values the first components would just be the largest-valued features
        steps.append(("pca_scaler", StandardScaler()))
        steps.append(("pca", PCA(n_components=pca.get("n_components", 0.95), random_state=seed)))
    steps.append(("scaler", build_scaler(str(select_params.get("scaler", "standard")), seed)))
    alpha = lasso.get("alpha")
    steps.append(
        (
            "lasso",
            LassoSelector(
                alpha=None if alpha is None else float(alpha),
                cv=int(lasso.get("cv", 5)),
                n_alphas=int(lasso.get("n_alphas", 100)),
                max_features=int(lasso.get("max_features", 20)),
                max_iter=int(lasso.get("max_iter", 10000)),
                random_state=seed,
                lambda_rule=str(lasso.get("lambda_rule", "min")),
            ),
        )
    )
    return steps


#: Values of ``select.scaler``.
SCALERS = ("standard", "yeo-johnson", "quantile")


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


def build_selection_pipeline(select_params: Mapping[str, Any], seed: int) -> Pipeline:
    """The selection part alone (used to precompute per-fold selections during tuning)."""
    return Pipeline(build_selection(select_params, seed)).set_output(transform="pandas")


def build_pipeline(
    model_name: str, model_params: Mapping[str, Any] | None, select_params: Mapping[str, Any], seed: int
) -> Pipeline:
    """The whole unfitted pipeline: selection steps then classifier ``model_name``."""
    steps = build_selection(select_params, seed)
    steps.append((CLASSIFIER_STEP, build_classifier(model_name, model_params, seed)))
    return Pipeline(steps).set_output(transform="pandas")
