"""`bonemet register`: register the best classifier of the latest train run; gate it to `staging`."""

from __future__ import annotations

import argparse
import logging

from bonemet.stages._common import params_from, run_tags

log = logging.getLogger(__name__)

# Runtime requirements of the served pyfunc (pinned like pyproject.toml). bonemet itself must be
# installed where the model is loaded (`--env-manager local` in this project's venv).
SERVING_REQUIREMENTS = [
    "mlflow==3.17.2",
    "scikit-learn==1.9.1",
    "skops==0.16.0",
    "numpy==2.4.6",
    "pandas==3.1.1",
    "scipy==1.17.1",
    "xgboost-cpu==3.2.0",
    "lightgbm==4.7.0",
]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="registry metrics JSON (default: params register.out)")


def run(args: argparse.Namespace) -> int:
    import os

    import pandas as pd

    from bonemet.config import section
    from bonemet.tracking.mlflow_backend import configure as configure_mlflow
    from bonemet.tracking.registry import RegistryError, register_best_classifier
    from bonemet.utils import write_json

    params = params_from(args)
    reg = section(params, "register")
    configure_mlflow(os.environ.get("MLFLOW_TRACKING_URI"), reg.get("store_dir", "mlruns"))
    features = pd.read_parquet(reg["features_file"])
    feature_names = [c for c in features.columns if c not in ("case_id", "label")]
    description_extra = ""
    try:
        with open(reg["table1_md"]) as fh:
            description_extra = "\nTable 1:\n" + fh.read()
    except OSError:
        log.warning("no Table 1 at %s: the model description will not include it", reg["table1_md"])
    try:
        result = register_best_classifier(
            experiment=reg["experiment"],
            model_name=reg["model_name"],
            input_example=features.head(2),
            feature_names=feature_names,
            threshold=float(reg["threshold"]),
            min_auc=float(reg["min_test_auc"]),
            tolerance=float(reg["tolerance"]),
            alias=reg["alias"],
            pip_requirements=SERVING_REQUIREMENTS,
            description_extra=description_extra,
            tags=run_tags(),
        )
    except RegistryError as exc:
        log.error("%s", exc)
        return 1
    print(f"{result.model_name} version {result.version} ({result.classifier}): "
          f"{'promoted to' if result.promoted else 'NOT promoted to'} '{reg['alias']}': {result.reason}")
    summary = result.to_dict()
    summary["promoted"] = int(result.promoted)
    write_json(args.out or reg["out"], summary)
    return 0
