"""Registering the best classifier of a `train` run, and the promotion gate's bookkeeping.

The choice (best mean CV AUC on the training set), the description (Table 1 rows, data hash,
git commit) and the gate decision are all recorded in MLflow: a `register` run in the
classification experiment, the model version's description and tags, and the alias.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from bonemet.serving.gate import PromotionDecision, decide_promotion
from bonemet.tracking.mlflow_backend import alias_version, set_alias
from bonemet.tracking.pyfunc import log_classifier

log = logging.getLogger(__name__)

SELECTION_METRIC = "cv_auc_mean"
TEST_METRIC = "test_auc"


class RegistryError(RuntimeError):
    """The runs needed for registration are missing or incomplete."""


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


def latest_train_runs(experiment: str, parent_name: str = "train") -> tuple[Any, list[Any]]:
    """The latest finished parent run called ``parent_name`` and its nested runs."""
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        raise RegistryError(f"experiment '{experiment}' not found: run the train stage first")
    client = MlflowClient()
    parents = [
        r
        for r in client.search_runs(
            [exp.experiment_id],
            filter_string=f"attributes.run_name = '{parent_name}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=20,
        )
        if "mlflow.parentRunId" not in r.data.tags
    ]
    if not parents:
        raise RegistryError(f"no finished '{parent_name}' run in experiment '{experiment}'")
    parent = parents[0]
    children = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=500
    )
    return parent, children


def best_child(children: Sequence[Any], metric: str = SELECTION_METRIC) -> Any:
    """The nested run with the highest ``metric`` that has a logged model."""
    scored = [c for c in children if metric in c.data.metrics and TEST_METRIC in c.data.metrics]
    if not scored:
        raise RegistryError(f"no classifier run carries the metrics '{metric}' and '{TEST_METRIC}'")
    return max(scored, key=lambda c: (c.data.metrics[metric], c.data.metrics[TEST_METRIC]))


def staging_test_auc(model_name: str, alias: str = "staging") -> tuple[str | None, float | None]:
    """Version and recorded test AUC of ``model_name@alias`` (None, None when there is none)."""
    version = alias_version(model_name, alias)
    if version is None:
        return None, None
    mv = MlflowClient().get_model_version(model_name, version)
    value = mv.tags.get(TEST_METRIC)
    return version, float(value) if value is not None else None


def register_best_classifier(
    *,
    experiment: str,
    model_name: str,
    input_example: pd.DataFrame,
    feature_names: Sequence[str],
    threshold: float,
    min_auc: float,
    tolerance: float,
    alias: str,
    pip_requirements: Sequence[str],
    description_extra: str = "",
    tags: Mapping[str, str] | None = None,
) -> RegistrationResult:
    """Register the best classifier of the latest train run and apply the promotion gate."""
    parent, children = latest_train_runs(experiment)
    best = best_child(children)
    classifier = best.data.tags.get("model", best.info.run_name)
    cv_auc = float(best.data.metrics[SELECTION_METRIC])
    test_auc = float(best.data.metrics[TEST_METRIC])
    pipeline = mlflow.sklearn.load_model(f"runs:/{best.info.run_id}/model")
    current_version, current_auc = staging_test_auc(model_name, alias)
    decision: PromotionDecision = decide_promotion(test_auc, current_auc, min_auc=min_auc, tolerance=tolerance)
    exp_id = mlflow.get_experiment_by_name(experiment).experiment_id
    run_tags = {**dict(tags or {}), "source_run_id": best.info.run_id, "train_run_id": parent.info.run_id}
    with mlflow.start_run(run_name="register", experiment_id=exp_id, tags=run_tags) as run:
        mlflow.log_params({"classifier": classifier, "threshold": threshold, "min_auc": min_auc, "tolerance": tolerance})
        mlflow.log_metrics({SELECTION_METRIC: cv_auc, TEST_METRIC: test_auc})
        info = log_classifier(
            pipeline,
            feature_names,
            threshold=threshold,
            model_name=classifier,
            input_example=input_example,
            pip_requirements=pip_requirements,
        )
        description = (
            f"{classifier} pipeline (ICC -> filters -> LASSO -> {classifier}) from train run {parent.info.run_id}.\n"
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
            "source_run_id": best.info.run_id,
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
        del run
    return RegistrationResult(
        model_name=model_name,
        version=str(mv.version),
        source_run_id=best.info.run_id,
        classifier=classifier,
        cv_auc_mean=cv_auc,
        test_auc=test_auc,
        promoted=decision.promote,
        reason=decision.reason,
        staging_version=str(mv.version) if decision.promote else current_version,
    )
