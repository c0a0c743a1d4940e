"""The registered classifier in-process, without MLflow: what ``bonemet predict`` classifies with.

The served model (:class:`bonemet.registry.pyfunc.ClassifierPyfunc`) is a pyfunc whose
artifacts are the fitted pipeline (skops) and a JSON file with its feature names and threshold.
Loading it through MLflow costs ``import mlflow`` (1.7 s on 2 cores) before anything else;
:class:`ServedClassifier` reads the same two artifacts of the same registered version (found by
:mod:`bonemet.registry.local`) and answers what the pyfunc answers: the same input checks
(:func:`bonemet.serving.checks.check_feature_frame`), the pipeline's probability of breast
origin, the label at the threshold. A test compares both answers on a real MLflow store, bit
for bit.

The pipeline is loaded with :func:`bonemet.modeling.persistence.load_pipeline`: only types from
the trusted modules are accepted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from bonemet.errors import UserError

#: artifact keys of the pyfunc (``bonemet.registry.pyfunc.log_classifier``)
PIPELINE_ARTIFACT = "pipeline"
META_ARTIFACT = "meta"


class ClassifierArtifactsError(UserError, ValueError):
    """A registered classifier's artifacts are missing or not what bonemet logs."""


@dataclass
class ServedClassifier:
    """Feature rows in, ``probability_breast`` and ``label`` out, as the registered pyfunc answers.

    Attributes:
        pipeline: the fitted scikit-learn pipeline.
        feature_names: the feature columns it expects, in order.
        threshold: the probability threshold registered with it.
        name, version: registered name and version (reported in results).
        model_name: which classifier (e.g. ``svm``), from the artifacts.
    """

    pipeline: Any
    feature_names: list[str]
    threshold: float
    name: str
    version: str
    model_name: str = ""

    @classmethod
    def from_artifacts(cls, artifacts: Mapping[str, str | Path], *, name: str, version: str) -> ServedClassifier:
        """Load from the pyfunc's artifact files (``{key: path}``, keys ``pipeline`` and ``meta``).

        Raises:
            ClassifierArtifactsError: an artifact is missing or its metadata lacks a key.
            bonemet.modeling.persistence.UntrustedPipelineError: the pipeline holds untrusted types.
        """
        from bonemet.modeling.persistence import load_pipeline

        where = f"{name} version {version}"
        missing = [k for k in (PIPELINE_ARTIFACT, META_ARTIFACT) if k not in artifacts]
        if missing:
            raise ClassifierArtifactsError(f"{where}: its artifacts lack {', '.join(missing)} (found "
                                           f"{', '.join(sorted(artifacts)) or 'none'}): was it logged by bonemet?")
        try:
            meta = json.loads(Path(artifacts[META_ARTIFACT]).read_text(encoding="utf-8"))
            feature_names, threshold = list(meta["feature_names"]), float(meta["threshold"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ClassifierArtifactsError(f"{where}: cannot read its metadata {artifacts[META_ARTIFACT]}: {exc!r}") from exc
        pipeline = load_pipeline(artifacts[PIPELINE_ARTIFACT])
        return cls(pipeline, feature_names, threshold, name, str(version), str(meta.get("model_name", "")))

    def predict(self, features: pd.DataFrame) -> pd.DataFrame:
        """``probability_breast`` and ``label`` (at :attr:`threshold`) per row.

        Raises:
            bonemet.serving.checks.FeatureInputError: rows that do not match the model's columns.
        """
        from bonemet.serving.checks import check_feature_frame

        x = check_feature_frame(features, self.feature_names)
        proba = self.pipeline.predict_proba(x)[:, 1]
        return pd.DataFrame({"probability_breast": proba, "label": (proba >= self.threshold).astype(int)})
