"""The registered classifier's answers, without MLflow: what the served pyfunc runs per request.

:func:`bonemet.registry.pyfunc.log_classifier` logs four artifacts: ``serving`` (the
:class:`~bonemet.modeling.reduction.ServingModel`: the pipeline cut to its selected columns, or
whole), ``domain`` (the :class:`~bonemet.modeling.domain.TrainingDomain`), ``meta`` (JSON: feature
names, threshold, ...) and ``pipeline`` (the whole fitted pipeline, for Python users; not loaded
here). :class:`ServedClassifier` loads them from their files and answers feature rows; the
MLflow pyfunc (:class:`bonemet.registry.pyfunc.ClassifierPyfunc`) is a thin wrapper around it,
and code that must not import MLflow can read the same artifact files and get the same answers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bonemet.errors import UserError
from bonemet.serving.checks import FeatureContract, FeatureInputError

#: Artifact keys of the logged classifier.
SERVING_ARTIFACT, DOMAIN_ARTIFACT, META_ARTIFACT, PIPELINE_ARTIFACT = "serving", "domain", "meta", "pipeline"


class ClassifierArtifactsError(UserError, ValueError):
    """A registered classifier's artifacts are missing or not what bonemet logs."""


@dataclass
class ServedClassifier:
    """Feature rows in; ``probability_breast``, ``label``, ``in_domain``, ``domain_reasons`` out.

    Attributes:
        serving: the fitted model it runs (:class:`~bonemet.modeling.reduction.ServingModel`).
        domain: the training domain (:class:`~bonemet.modeling.domain.TrainingDomain`).
        feature_names: every feature column it accepts (its training columns), in order.
        threshold: the registered probability threshold.
        model_name: which classifier (e.g. ``logreg``).
        volume_column: the shape feature the lesion volume is read from, when the model has it.
        name, version: registered name and version (reported in results).
    """

    serving: Any
    domain: Any
    feature_names: list[str]
    threshold: float
    model_name: str = ""
    volume_column: str | None = None
    name: str = ""
    version: str = ""

    def __post_init__(self) -> None:
        self.contract = FeatureContract(known=tuple(self.feature_names), required=tuple(self.serving.columns),
                                        text_columns=tuple(self.serving.text_columns),
                                        optional=(self.volume_column,) if self.volume_column else ())

    @classmethod
    def from_artifacts(cls, artifacts: Mapping[str, str | Path], *, name: str = "",
                       version: str = "") -> ServedClassifier:
        """Load from the logged artifact files (``{key: path}``).

        Raises:
            ClassifierArtifactsError: an artifact is missing or its metadata lacks a key.
            bonemet.modeling.persistence.UntrustedPipelineError: a file holds untrusted types.
        """
        from bonemet.modeling.persistence import load_pipeline

        where = f"{name} version {version}" if name else "classifier"
        missing = [k for k in (SERVING_ARTIFACT, DOMAIN_ARTIFACT, META_ARTIFACT) if k not in artifacts]
        if missing:
            raise ClassifierArtifactsError(f"{where}: its artifacts lack {', '.join(missing)} (found "
                                           f"{', '.join(sorted(artifacts)) or 'none'}): was it logged by bonemet?")
        try:
            meta = json.loads(Path(artifacts[META_ARTIFACT]).read_text(encoding="utf-8"))
            feature_names, threshold = list(meta["feature_names"]), float(meta["threshold"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ClassifierArtifactsError(f"{where}: cannot read its metadata {artifacts[META_ARTIFACT]}: {exc!r}") from exc
        return cls(serving=load_pipeline(artifacts[SERVING_ARTIFACT]), domain=load_pipeline(artifacts[DOMAIN_ARTIFACT]),
                   feature_names=feature_names, threshold=threshold, model_name=str(meta.get("model_name", "")),
                   volume_column=meta.get("volume_column"), name=name, version=str(version))

    def answer(self, frame: pd.DataFrame, threshold: float | None = None) -> pd.DataFrame:
        """One answer row per feature row (``case_id`` first when sent).

        Raises:
            FeatureInputError: rows that do not match the model's columns, or a threshold outside [0, 1].
            UserError: a row the pipeline refuses (e.g. a site its harmonisation never saw).
        """
        values, texts, optional = self.contract.read(frame)
        threshold = check_threshold(self.threshold if threshold is None else threshold)
        Z = self.serving.classifier_input(values, texts)
        proba = np.asarray(self.serving.proba_of(Z), dtype=np.float64)
        volumes = optional[self.volume_column] / 1000.0 if self.volume_column in optional else None  # mm^3 -> mL
        reasons = self.domain.feature_reasons(np.asarray(Z, dtype=np.float64), volumes)
        columns = {"case_id": frame["case_id"].astype(str).to_numpy()} if "case_id" in frame.columns else {}
        columns.update(probability_breast=proba, label=(proba >= threshold).astype(int),
                       in_domain=[not r for r in reasons], domain_reasons=reasons)
        return pd.DataFrame(columns)

    def predict(self, features: pd.DataFrame) -> pd.DataFrame:
        """:meth:`answer` at the registered threshold."""
        return self.answer(features)


def check_threshold(value: Any) -> float:
    """A probability threshold in [0, 1], or :class:`FeatureInputError`."""
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        raise FeatureInputError(f"threshold must be a number in [0, 1]; found {type(value).__name__}") from None
    if not 0.0 <= threshold <= 1.0:
        raise FeatureInputError(f"threshold must be within [0, 1]; found {threshold}")
    return threshold
