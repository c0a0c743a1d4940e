"""What the register stage registers: the train and evaluate stages' outputs, read and checked.

The train stage writes ``<models_dir>/index.json`` (the registered model, by ``register.model``:
a family, or ``best_cv``; its metrics and feature names), ``<models_dir>/<model>.skops`` (its tuned
pipeline fitted on the committed split's training set, with calibration and threshold),
``<models_dir>/<model>.domain.skops`` (the domain of its training cases) and
``<train.metrics_dir>/train_runs.json`` (its MLflow runs); the evaluate stage writes
``repeated.json`` (the rule's repeated estimate, which the gate judges, and every family's).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bonemet.registry.registration import RegistryError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainedClassifier:
    """The registered family's fitted pipeline and everything the registration records with it."""

    classifier: str
    rule: str
    index: dict[str, Any]
    provenance: dict[str, Any]
    repeated: dict[str, Any]
    pipeline: Any
    domain: Any
    #: text columns the pipeline reads besides the features (``site`` for ComBat)
    text_columns: list[str]
    #: Table 1 (markdown) for the model's description, or "" when there is none
    table1: str

    @property
    def feature_source(self) -> str | None:
        return self.index.get("feature_source")


def read_trained_classifier(models_dir: str | Path, train_runs: str | Path, repeated: str | Path,
                            table1_md: str | Path, *, registered_rule: str) -> TrainedClassifier:
    """Read the train and evaluate stages' outputs for the model ``registered_rule`` chose.

    Raises:
        RegistryError: a file is missing, unreadable or lacks a key (naming the files and the
            stages to run), the models were trained for another ``register.model``, or the
            model's training domain is missing.
    """
    from bonemet.modeling.domain import domain_file
    from bonemet.modeling.persistence import load_pipeline

    models_dir = Path(models_dir)
    try:
        index = json.loads((models_dir / "index.json").read_text(encoding="utf-8"))
        provenance = json.loads(Path(train_runs).read_text(encoding="utf-8"))
        repeated_estimate = json.loads(Path(repeated).read_text(encoding="utf-8"))
        classifier = str(index["registered_model"])
        rule = str(index["registered_rule"])
        entry = index["models"][classifier]
        pipeline_path = models_dir / entry["path"]
        domain_path = models_dir / domain_file(classifier)
        if not {"cv_auc_mean", "test_auc", "threshold"} <= set(entry) or "feature_names" not in index:
            raise KeyError("cv_auc_mean, test_auc, threshold or feature_names")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RegistryError(f"{models_dir}/index.json, {train_runs} or {repeated} cannot be read or lack a "
                            f"key ({exc}); run `bonemet train` and `bonemet evaluate` first") from exc
    if rule != registered_rule:
        raise RegistryError(f"{models_dir}/index.json was trained for register.model {rule}, params say "
                            f"{registered_rule}: rerun the train and evaluate stages (`dvc repro`) before registering")
    pipeline = load_pipeline(pipeline_path)
    if not domain_path.is_file():
        raise RegistryError(f"{domain_path} not found (the domain of {classifier}'s training cases): run `bonemet train`")
    domain = load_pipeline(domain_path)
    try:
        table1 = Path(table1_md).read_text(encoding="utf-8")
    except OSError:
        log.warning("no Table 1 at %s: the model description will not include it", table1_md)
        table1 = ""
    return TrainedClassifier(classifier=classifier, rule=rule, index=index, provenance=provenance,
                             repeated=repeated_estimate, pipeline=pipeline, domain=domain,
                             text_columns=[str(c) for c in index.get("extra_input_columns", [])], table1=table1)
