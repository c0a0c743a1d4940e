"""`bonemet register`: register the classifier the repeated evaluation names; gate it to `staging`.

Reads the evaluate stage's ``register.repeated`` (``repeated.json``: the model with the highest
mean repeated test AUC, and the estimate the gate judges), the train stage's outputs
(``register.models_dir``: ``<model>.skops`` is that model fitted on the committed split's
training set, with its calibration and threshold; ``index.json`` its metrics and feature names;
``provenance.json`` the MLflow runs) and a few feature rows for the signature; writes
``register.out``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

#: Distributions the served pyfunc imports; their versions are read from this environment.
SERVING_DISTRIBUTIONS = ("mlflow", "scikit-learn", "skops", "numpy", "pandas", "scipy", "xgboost-cpu", "lightgbm")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="registry metrics JSON (default: params register.out)")


def pinned(distributions: tuple[str, ...]) -> list[str]:
    """``name==version`` for each installed distribution (``importlib.metadata``), in order."""
    import importlib.metadata as md

    return [f"{name}=={md.version(name)}" for name in distributions]


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from bonemet.modeling.persistence import load_pipeline
    from bonemet.registry.registration import RegistryError, register_classifier
    from bonemet.stages._common import open_store, run_tags, specs_from
    from bonemet.utils import write_json

    params = specs_from(args)
    reg = params.registration
    models_dir = Path(reg.models_dir)
    try:
        index = json.loads((models_dir / "index.json").read_text(encoding="utf-8"))
        provenance = json.loads((models_dir / "provenance.json").read_text(encoding="utf-8"))
        repeated = json.loads(Path(reg.repeated).read_text(encoding="utf-8"))
        classifier = str(repeated["registered_model"])
        entry = index["models"][classifier]
        pipeline_path = models_dir / entry["path"]
        if not {"cv_auc_mean", "test_auc", "threshold"} <= set(entry) or "feature_names" not in index:
            raise KeyError("cv_auc_mean, test_auc, threshold or feature_names")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RegistryError(f"{models_dir}/index.json, provenance.json or {reg.repeated} cannot be read or lack a "
                            f"key ({exc}); run `bonemet train` and `bonemet evaluate` first") from exc
    pipeline = load_pipeline(pipeline_path)
    features = pd.read_parquet(reg.features_file)
    description_extra = ""
    try:
        description_extra = "\nTable 1:\n" + Path(reg.table1_md).read_text(encoding="utf-8")
    except OSError:
        log.warning("no Table 1 at %s: the model description will not include it", reg.table1_md)
    open_store(params)
    result = register_classifier(
        experiment=reg.experiment,
        store_dir=params.tracking.store_dir,
        model_name=reg.model_name,
        classifier=classifier,
        index=index,
        provenance=provenance,
        repeated=repeated,
        pipeline=pipeline,
        input_example=features.head(2),
        min_auc=reg.min_auc,
        min_auc_lower_bound=reg.min_auc_lower_bound,
        min_sensitivity=reg.min_sensitivity,
        min_specificity=reg.min_specificity,
        tolerance=reg.tolerance,
        alias=reg.alias,
        pip_requirements=pinned(SERVING_DISTRIBUTIONS),
        description_extra=description_extra,
        tags=run_tags(params.data.cohort_dir),
    )
    print(f"{result.model_name} version {result.version} ({result.classifier}): "
          f"{'promoted to' if result.promoted else 'NOT promoted to'} '{reg.alias}': {result.reason}")
    summary = result.to_dict()
    summary["promoted"] = int(result.promoted)
    write_json(args.out or reg.out, summary)
    return 0
