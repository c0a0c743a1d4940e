"""Feature tables and fitted classifiers the serving tests make themselves (not a test module).

The rows carry the 1316 PyRadiomics feature names of the default settings, values spread over
orders of magnitude as radiomic features are, a label carried by a few of them, and a paired
(re-segmented) copy for the ICC filter; the lesion volume (``original_shape_VoxelVolume``, mm^3)
lies between 0.5 and 20 mL.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

NAMES = (Path(__file__).parent / "data" / "radiomics_feature_names_default.txt").read_text().split()
VOLUME = "original_shape_VoxelVolume"


def feature_tables(n: int = 60, seed: int = 0, names: list[str] = NAMES) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(primary, paired)`` feature tables: case_id, label, then ``names``. The features' scales
    and which carry the label are the same for every ``seed`` (one population); the cases differ."""
    population = np.random.default_rng(12345)
    scale = 10.0 ** population.uniform(-3, 5, size=len(names))
    signal = np.zeros(len(names))
    signal[population.choice(len(names), min(12, len(names)), replace=False)] = 1.0
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    latent = rng.standard_normal((n, len(names))) + 0.9 * y[:, None] * signal
    values = scale * (1.0 + 0.25 * latent)
    volume = names.index(VOLUME) if VOLUME in names else None
    if volume is not None:
        values[:, volume] = 1000.0 * rng.uniform(0.5, 20.0, size=n)
    primary = pd.DataFrame(values, columns=names)
    paired = primary * (1.0 + rng.normal(scale=0.01, size=primary.shape))
    for table in (primary, paired):
        table.insert(0, "case_id", [f"case_{i:03d}" for i in range(n)])
        table.insert(1, "label", y)
    return primary, paired


def fitted_model(primary: pd.DataFrame, paired: pd.DataFrame, params, *, model: str = "logreg",
                 hyperparameters: dict | None = None, select: dict | None = None):
    """The project's pipeline (ICC, filters, scaler, LASSO, classifier) fitted on all rows, with a
    sigmoid calibrator and a threshold: what the train stage saves."""
    from bonemet.modeling.calibration import CalibratedPipeline, ScoreCalibrator
    from bonemet.modeling.pipeline import build_pipeline
    from bonemet.modeling.training import assemble_features

    spec = params.select.updated({"lasso.cv": 3, "lasso.max_features": 8, **(select or {})})
    X, y = assemble_features(primary, paired, spec.icc.paired_prefix)
    hp = {"solver": "saga", "max_iter": 5000, "C": 1.0, "l1_ratio": 0.5} if hyperparameters is None else hyperparameters
    pipeline = build_pipeline(model, hp, spec, 0).fit(X, y.to_numpy())
    names = [c for c in primary.columns if c not in ("case_id", "label")]
    scores = pipeline.predict_proba(X[names])[:, 1]
    calibrator = ScoreCalibrator(method="sigmoid").fit(scores, y.to_numpy())
    return CalibratedPipeline(pipeline=pipeline, calibrator=calibrator, threshold=0.5)


def fitted_domain(model, primary: pd.DataFrame, spec, *, folds: int = 3, images=None):
    """The model's training domain (``spec``: ``train.domain`` params) on all rows of ``primary``
    (folds by row number)."""
    from bonemet.modeling.domain import fit_training_domain

    names = [c for c in primary.columns if c not in ("case_id", "label")]
    return fit_training_domain(model, primary[names], np.arange(len(primary)) % folds, spec, seed=0,
                               images=images)
