"""The served classifier: an MLflow pyfunc around a fitted scikit-learn pipeline.

It checks the input rows (bonemet.serving.checks) and answers, per row, the probability of
breast origin and the label at the registered threshold. Bad input raises an MlflowException
with INVALID_PARAMETER_VALUE, which `mlflow models serve` answers with HTTP 400 (never 500).
The pipeline is stored with skops; only types from the modules in
:data:`bonemet.modeling.persistence.TRUSTED_MODULES` are loaded.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from bonemet.modeling.persistence import save_pipeline

log = logging.getLogger(__name__)

PIPELINE_FILE = "pipeline.skops"
META_FILE = "classifier.json"


class ClassifierPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc model: feature rows in, ``probability_breast`` and ``label`` out."""

    def load_context(self, context: Any) -> None:
        from bonemet.modeling.persistence import load_pipeline

        self.pipeline = load_pipeline(context.artifacts["pipeline"])
        meta = json.loads(Path(context.artifacts["meta"]).read_text(encoding="utf-8"))
        self.feature_names: list[str] = meta["feature_names"]
        self.threshold: float = float(meta["threshold"])
        self.model_name: str = meta.get("model_name", "")

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would parse them
        """Probability of breast origin and label per row; case_id is echoed when sent."""
        from bonemet.serving.checks import FeatureInputError, check_feature_frame

        if isinstance(model_input, dict):
            model_input = pd.DataFrame(model_input)
        try:
            features = check_feature_frame(model_input, self.feature_names)
        except FeatureInputError as exc:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from exc
        threshold = float((params or {}).get("threshold", self.threshold))
        proba = self.pipeline.predict_proba(features)[:, 1]
        out = pd.DataFrame({"probability_breast": proba, "label": (proba >= threshold).astype(int)})
        if "case_id" in model_input.columns:
            out.insert(0, "case_id", model_input["case_id"].astype(str).to_numpy())
        return out


def log_classifier(
    pipeline: Any,
    feature_names: Sequence[str],
    *,
    threshold: float,
    model_name: str,
    input_example: pd.DataFrame,
    pip_requirements: Sequence[str],
    name: str = "classifier",
) -> Any:
    """Log the pyfunc classifier to the active run; returns MLflow's ModelInfo."""
    from mlflow.models import infer_signature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    with tempfile.TemporaryDirectory() as tmp:
        pipe_path = Path(tmp) / PIPELINE_FILE
        meta_path = Path(tmp) / META_FILE
        save_pipeline(pipeline, pipe_path)
        meta_path.write_text(
            json.dumps(
                {"feature_names": list(feature_names), "threshold": threshold, "model_name": model_name}
            ),
            encoding="utf-8",
        )
        example = input_example.loc[:, list(feature_names)].astype("float64")
        proba = pipeline.predict_proba(example)[:, 1]
        output = pd.DataFrame({"probability_breast": proba, "label": (proba >= threshold).astype(int)})
        signature = infer_signature(example, output)
        # case_id is optional: echoed back so a client can match answers to its rows.
        signature.inputs = Schema([*signature.inputs.inputs, ColSpec("string", "case_id", required=False)])
        signature.params = ParamSchema([ParamSpec("threshold", "double", threshold)])
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=ClassifierPyfunc(),
            artifacts={"pipeline": str(pipe_path), "meta": str(meta_path)},
            signature=signature,
            input_example=example.head(2),
            pip_requirements=list(pip_requirements),
        )
