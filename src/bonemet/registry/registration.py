"""Registering the train stage's best classifier, and the promotion gate's bookkeeping.

The register stage reads what the train stage wrote (``models/index.json`` names the best
pipeline, chosen by :func:`bonemet.modeling.training.choose_best_model`; ``models/<best>.skops``
is that pipeline): its inputs are files that DVC tracks, not "the latest run" in MLflow. The
description (Table 1 rows, data hash, git commit) and the gate decision are recorded in MLflow:
a `register` run in the classification experiment, the model version's description and tags,
and the alias.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from bonemet.errors import UserError
from bonemet.registry.gate import PromotionDecision, decide_promotion
from bonemet.registry.pyfunc import log_classifier
from bonemet.registry.store import alias_version, ensure_experiment, set_alias

log = logging.getLogger(__name__)

SELECTION_METRIC = "cv_auc_mean"
TEST_METRIC = "test_auc"


class RegistryError(UserError, RuntimeError):
    """The train stage's outputs needed for registration are missing or incomplete."""


@dataclass
class RegistrationResult:
    model_name: str
    version: str
    source_run_id: str
    classifier: str
    cv_auc_mean: float
    test_auc: float
    promoted: bool
    reason: str
    staging_version: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def staging_test_auc(model_name: str, alias: str) -> tuple[str | None, float | None]:
    """Version and recorded test AUC of ``model_name@alias`` (None, None when there is none)."""
    version = alias_version(model_name, alias)
    if version is None:
        return None, None
    mv = MlflowClient().get_model_version(model_name, version)
    value = mv.tags.get(TEST_METRIC)
    return version, float(value) if value is not None else None


def register_classifier(
    *,
    experiment: str,
    store_dir: str,
    model_name: str,
    index: Mapping[str, Any],
    provenance: Mapping[str, Any],
    pipeline: Any,
    input_example: pd.DataFrame,
    threshold: float,
    min_auc: float,
    tolerance: float,
    alias: str,
    pip_requirements: Sequence[str],
    description_extra: str,
    tags: Mapping[str, str],
) -> RegistrationResult:
    """Register the train stage's best pipeline as a new version of ``model_name`` and apply the gate.

    Args:
        index: the train stage's ``models/index.json`` (``best_model``, each model's CV and test
            AUC, ``feature_names``); ``provenance``: its ``models/provenance.json`` (run ids).
        pipeline: the fitted pipeline of ``index["best_model"]`` (``models/<best>.skops``).
        input_example: a few feature rows for the model's signature.
        threshold: probability of breast origin at or above which the label is 1.
        min_auc, tolerance, alias: the gate (see :func:`bonemet.registry.gate.decide_promotion`).
        pip_requirements: the served model's requirements.
        description_extra: appended to the version's description (e.g. Table 1).
        tags: run tags (git commit, data hash).
    """
    classifier = str(index["best_model"])
    entry = index["models"][classifier]
    cv_auc = float(entry["cv_auc_mean"])
    test_auc = float("nan") if entry["test_auc"] is None else float(entry["test_auc"])  # undefined: one class
    source_run_id = str((provenance.get("models", {}).get(classifier) or {}).get("run_id") or "")
    train_run_id = str(provenance.get("train_run_id") or "")
    current_version, current_auc = staging_test_auc(model_name, alias)
    decision: PromotionDecision = decide_promotion(test_auc, current_auc, min_auc=min_auc, tolerance=tolerance)
    exp_id = ensure_experiment(experiment, store_dir)
    run_tags = {**dict(tags), "source_run_id": source_run_id, "train_run_id": train_run_id}
    with mlflow.start_run(run_name="register", experiment_id=exp_id, tags=run_tags):
        mlflow.log_params({"classifier": classifier, "threshold": threshold, "min_auc": min_auc, "tolerance": tolerance})
        mlflow.log_metrics({k: v for k, v in {SELECTION_METRIC: cv_auc, TEST_METRIC: test_auc}.items()
                            if math.isfinite(v)})
        info = log_classifier(
            pipeline,
            list(index["feature_names"]),
            threshold=threshold,
            model_name=classifier,
            input_example=input_example,
            pip_requirements=pip_requirements,
        )
        description = (
            f"{classifier} pipeline (ICC -> filters -> LASSO -> {classifier}) from train run {train_run_id or '?'}.\n"
            f"mean CV AUC (training set) {cv_auc:.3f}; test AUC {test_auc:.3f}.\n"
            f"data_md5 {run_tags.get('data_md5', 'unknown')}; git_commit {run_tags.get('git_commit', 'unknown')}.\n"
            + description_extra
        )
        version_tags = {
            "classifier": classifier,
            SELECTION_METRIC: f"{cv_auc:.6f}",
            TEST_METRIC: f"{test_auc:.6f}",
            "data_md5": run_tags.get("data_md5", "unknown"),
            "git_commit": run_tags.get("git_commit", "unknown"),
            "source_run_id": source_run_id,
        }
        mv = mlflow.register_model(info.model_uri, model_name, tags=version_tags)
        MlflowClient().update_model_version(model_name, mv.version, description=description)
        mlflow.set_tags({"gate_decision": "promote" if decision.promote else "hold", "gate_reason": decision.reason})
        mlflow.log_dict(
            {"version": str(mv.version), "promote": decision.promote, "reason": decision.reason,
             "current_staging_version": current_version, "current_staging_auc": current_auc},
            "gate_decision.json",
        )
        if decision.promote:
            set_alias(model_name, alias, mv.version)
        log.info(
            "%s version %s (%s): %s -> %s",
            model_name, mv.version, classifier, decision.reason,
            f"alias '{alias}' set" if decision.promote else f"alias '{alias}' unchanged",
        )
    return RegistrationResult(
        model_name=model_name,
        version=str(mv.version),
        source_run_id=source_run_id,
        classifier=classifier,
        cv_auc_mean=cv_auc,
        test_auc=test_auc,
        promoted=decision.promote,
        reason=decision.reason,
        staging_version=str(mv.version) if decision.promote else current_version,
    )
