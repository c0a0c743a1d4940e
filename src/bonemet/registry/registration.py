"""Registering the classifier the repeated evaluation names, and the promotion gate's bookkeeping.

The register stage reads what the train and evaluate stages wrote: the train stage's
``index.json`` names the model to register (the family ``register.model`` names, or with
``best_cv`` the highest CV AUC on the training set: no test set read), and the evaluate stage's
``repeated.json`` carries the estimate the gate judges (that rule applied in every repeat) and
every family's, which the gate compares it with; ``models/<model>.skops`` is that model fitted
on the committed split's training set, and ``models/index.json`` its CV and test AUC, threshold
and feature names: files that DVC tracks, not "the latest run" in MLflow. The
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

import pandas as pd
from mlflow.tracking import MlflowClient

from bonemet.errors import UserError
from bonemet.registry.gate import Estimate, PromotionDecision, best_family, decide_promotion
from bonemet.registry.pyfunc import log_classifier
from bonemet.registry.store import MlflowTracker, alias_version, register_model, set_alias, version_tags
from bonemet.tracking.base import Tracker

log = logging.getLogger(__name__)

SELECTION_METRIC = "cv_auc_mean"
TEST_METRIC = "test_auc"
#: Version tags the gate reads back from the staging version.
ESTIMATE_TAGS = {"auc_mean": "repeated_auc_mean", "auc_lower_bound": "repeated_auc_lo",
                 "sensitivity": "repeated_sensitivity", "specificity": "repeated_specificity"}


class RegistryError(UserError, RuntimeError):
    """The train or evaluate stage's outputs needed for registration are missing or incomplete."""


@dataclass
class RegistrationResult:
    model_name: str
    version: str
    source_run_id: str
    classifier: str
    threshold: float
    cv_auc_mean: float
    test_auc: float
    repeated_auc_mean: float
    repeated_auc_lo: float
    registered_rule: str
    registered_by: str
    best_repeated_model: str | None
    promoted: bool
    reason: str
    compared_with_staging: bool
    staging_version: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def staging_estimate(store: MlflowClient, model_name: str, alias: str) -> tuple[str | None, Estimate | None]:
    """Version and recorded repeated estimate of ``model_name@alias`` in ``store`` (None, None when there is none)."""
    version = alias_version(store, model_name, alias)
    if version is None:
        return None, None
    tags = version_tags(store, model_name, version)

    def number(key: str) -> float:
        try:
            return float(tags[key])
        except (KeyError, ValueError):
            return math.nan

    return version, Estimate(**{field: number(tag) for field, tag in ESTIMATE_TAGS.items()},
                             data_md5=str(tags.get("data_md5", "unknown")))


def estimate_of(repeated: Mapping[str, Any], model: str, data_md5: str) -> Estimate:
    """The gate's view of ``model`` in the evaluate stage's ``repeated.json``."""
    entry = repeated["models"][model]
    return Estimate(auc_mean=_nan(entry["auc"]["mean"]), auc_lower_bound=_nan(entry["auc"]["lo"]),
                    sensitivity=_nan(entry["sensitivity_mean"]), specificity=_nan(entry["specificity_mean"]),
                    data_md5=data_md5)


def registered_estimate(repeated: Mapping[str, Any], data_md5: str) -> Estimate:
    """The gate's view of the registered rule in ``repeated.json``: its ``chosen`` model, repeat by repeat."""
    entry = repeated["chosen"]
    return Estimate(auc_mean=_nan(entry["auc"]["mean"]), auc_lower_bound=_nan(entry["auc"]["lo"]),
                    sensitivity=_nan(entry["sensitivity_mean"]), specificity=_nan(entry["specificity_mean"]),
                    data_md5=data_md5)


def _nan(value: Any) -> float:
    return math.nan if value is None else float(value)


@dataclass(frozen=True)
class _Candidate:
    """The model to register as the train stage describes it (``index.json``, ``train_runs.json``)."""

    classifier: str
    cv_auc: float
    #: NaN when undefined (a test set of one class)
    test_auc: float
    threshold: float
    #: the rule that names it (``register.model``) and that rule in words
    rule: str
    rule_text: str
    source_run_id: str
    train_run_id: str

    @classmethod
    def from_index(cls, classifier: str, index: Mapping[str, Any], provenance: Mapping[str, Any]) -> _Candidate:
        entry = index["models"][classifier]
        rule = str(index.get("registered_rule", classifier))
        return cls(
            classifier=classifier, cv_auc=float(entry["cv_auc_mean"]),
            test_auc=float("nan") if entry["test_auc"] is None else float(entry["test_auc"]),
            threshold=float(entry["threshold"]), rule=rule, rule_text=str(index.get("registered_by", rule)),
            source_run_id=str((provenance.get("models", {}).get(classifier) or {}).get("run_id") or ""),
            train_run_id=str(provenance.get("train_run_id") or ""),
        )

    def description(self, estimate: Estimate, n_repeats: Any, git_commit: str, description_extra: str) -> str:
        """The model version's description: what was fitted, how it was chosen, its estimates."""
        classifier = self.classifier
        return (
            f"{classifier} pipeline (ICC -> filters -> LASSO -> {classifier} -> calibration, Optuna-tuned) fitted on "
            f"the committed split's training set (train run {self.train_run_id or '?'}); registered by "
            f"{self.rule_text}.\n"
            f"repeated test AUC over {n_repeats} splits {estimate.auc_mean:.3f} (corrected lower bound "
            f"{estimate.auc_lower_bound:.3f}); "
            f"committed split: mean CV AUC {self.cv_auc:.3f}, test AUC {self.test_auc:.3f}; "
            f"threshold {self.threshold:.3f}.\n"
            f"data_md5 {estimate.data_md5}; git_commit {git_commit}.\n"
            + description_extra
        )

    def metrics(self, estimate: Estimate) -> dict[str, float]:
        """The register run's metrics: the committed split's AUCs and the repeated estimate."""
        return {SELECTION_METRIC: self.cv_auc, TEST_METRIC: self.test_auc,
                **{tag: getattr(estimate, field) for field, tag in ESTIMATE_TAGS.items()}}

    def version_tags(self, estimate: Estimate, run_tags: Mapping[str, str], serving_mode: str) -> dict[str, str]:
        """The model version's tags (the gate reads :data:`ESTIMATE_TAGS` back from the staging version)."""
        return {
            "classifier": self.classifier,
            "registered_rule": self.rule,
            SELECTION_METRIC: f"{self.cv_auc:.6f}",
            TEST_METRIC: f"{self.test_auc:.6f}",
            "threshold": f"{self.threshold:.6f}",
            **{tag: f"{getattr(estimate, field):.6f}" for field, tag in ESTIMATE_TAGS.items()},
            "data_md5": estimate.data_md5,
            "git_commit": run_tags.get("git_commit", "unknown"),
            "source_run_id": self.source_run_id,
            "serving_mode": serving_mode,
            # the DVC experiment that registered it (`dvc exp show` names the same one)
            **{k: v for k, v in run_tags.items() if k == "dvc_exp"},
        }


def _gate_record(version: str, decision: PromotionDecision, current_version: str | None, current: Estimate | None,
                 estimate: Estimate, families: Mapping[str, Estimate], *, rule: str, max_gap_to_best: float,
                 best_repeated: str | None) -> dict[str, Any]:
    """The gate's decision as the register run's ``gate_decision.json``."""
    return {"version": version, "promote": decision.promote, "reason": decision.reason,
            "compared_with_staging": decision.compared_with_staging,
            "current_staging_version": current_version,
            "current_staging_estimate": None if current is None else asdict(current),
            "estimate": asdict(estimate), "registered_rule": rule, "max_gap_to_best": max_gap_to_best,
            "best_repeated_model": best_repeated,
            "families": {m: asdict(e) for m, e in families.items()}}


def register_classifier(
    *,
    tracker: MlflowTracker, model_name: str,
    classifier: str,
    index: Mapping[str, Any], provenance: Mapping[str, Any], repeated: Mapping[str, Any],
    pipeline: Any, domain: Any, check_rows: pd.DataFrame,
    min_auc: float, min_auc_lower_bound: float, min_sensitivity: float, min_specificity: float,
    tolerance: float, max_gap_to_best: float, alias: str,
    description_extra: str,
    tags: Mapping[str, str],
    text_columns: Sequence[str] = (),
    pip_requirements: Sequence[str] | None = None,
) -> RegistrationResult:
    """Register ``classifier``'s fitted pipeline as a new version of ``model_name`` and apply the gate.

    Args:
        tracker: the registration experiment's tracker: the `register` run is its run, the model
            its logged model, the version and alias go to its store.
        classifier: the model to register (``index.json``'s ``registered_model``, by the rule
            ``index["registered_rule"]``, ``register.model``); ``pipeline`` is its tuned pipeline as
            fitted on the committed split's training set (``models/<classifier>.skops``), with its
            calibration and threshold.
        index: the train stage's ``models/index.json`` (each model's CV and test AUC, threshold,
            ``feature_names``); ``provenance``: its ``metrics/train_runs.json`` (run ids).
        repeated: the evaluate stage's ``repeated.json``: the rule's estimate (``chosen``) and every
            family's (``models``), which the gate compares with (``max_gap_to_best``).
        domain: the model's :class:`~bonemet.modeling.domain.TrainingDomain` (train stage).
        check_rows: feature rows (the feature table): the served form is checked on them bit for
            bit (see :func:`bonemet.modeling.reduction.serving_model`); two are the input example.
        min_auc, min_auc_lower_bound, min_sensitivity, min_specificity, tolerance, max_gap_to_best, alias: the gate
            (see :func:`bonemet.registry.gate.decide_promotion`).
        description_extra: appended to the version's description (e.g. Table 1).
        tags: run tags (git commit, data hash).
        text_columns: text columns the pipeline reads besides the features (``site``).
        pip_requirements: None (default): the installed versions of what the model imports.
    """
    candidate = _Candidate.from_index(classifier, index, provenance)
    data_md5 = str(tags.get("data_md5", "unknown"))
    if repeated.get("registered_model") not in (None, classifier):
        raise RegistryError(f"the evaluate stage's repeated.json was made for {repeated['registered_model']}, the train "
                            f"stage's index.json registers {classifier}: rerun `bonemet evaluate` (dvc repro)")
    estimate = registered_estimate(repeated, data_md5)
    families = {m: estimate_of(repeated, m, data_md5) for m in repeated["models"]}
    store = tracker.client
    current_version, current = staging_estimate(store, model_name, alias)
    decision: PromotionDecision = decide_promotion(
        estimate, current, min_auc=min_auc, min_auc_lower_bound=min_auc_lower_bound,
        min_sensitivity=min_sensitivity, min_specificity=min_specificity, tolerance=tolerance,
        max_gap_to_best=max_gap_to_best, model=classifier, families=families)
    best_repeated = best_family(families)
    run_tags = {**dict(tags), "source_run_id": candidate.source_run_id, "train_run_id": candidate.train_run_id,
                "registered_model": classifier, "registered_rule": candidate.rule, "registered_by": candidate.rule_text}
    with tracker.run("register", tags=run_tags):
        tracker.log_params({"classifier": classifier, "threshold": candidate.threshold, "min_auc": min_auc,
                            "min_auc_lower_bound": min_auc_lower_bound, "min_sensitivity": min_sensitivity,
                            "min_specificity": min_specificity, "tolerance": tolerance,
                            "max_gap_to_best": max_gap_to_best, "registered_rule": candidate.rule})
        tracker.log_metrics({k: v for k, v in candidate.metrics(estimate).items() if math.isfinite(v)})
        info = log_classifier(tracker, pipeline, list(index["feature_names"]), threshold=candidate.threshold,
                              model_name=classifier, domain=domain, check_rows=check_rows, text_columns=text_columns,
                              pip_requirements=pip_requirements)
        version = register_model(
            store, info, model_name,
            description=candidate.description(estimate, repeated["n_repeats"], run_tags.get("git_commit", "unknown"),
                                              description_extra),
            tags=candidate.version_tags(estimate, run_tags, str((info.metadata or {}).get("serving_mode", ""))))
        tracker.set_tags({"gate_decision": "promote" if decision.promote else "hold", "gate_reason": decision.reason})
        tracker.log_dict(_gate_record(version, decision, current_version, current, estimate, families,
                                      rule=candidate.rule, max_gap_to_best=max_gap_to_best, best_repeated=best_repeated),
                         "gate_decision.json")
        if decision.promote:
            set_alias(store, model_name, alias, version)
        log.info("%s version %s (%s): %s -> %s", model_name, version, classifier, decision.reason,
                 f"alias '{alias}' set" if decision.promote else f"alias '{alias}' unchanged")
    return RegistrationResult(
        model_name=model_name, version=version, source_run_id=candidate.source_run_id, classifier=classifier,
        threshold=candidate.threshold, cv_auc_mean=candidate.cv_auc, test_auc=candidate.test_auc,
        repeated_auc_mean=estimate.auc_mean, repeated_auc_lo=estimate.auc_lower_bound, registered_rule=candidate.rule,
        registered_by=candidate.rule_text, best_repeated_model=best_repeated, promoted=decision.promote,
        reason=decision.reason, compared_with_staging=decision.compared_with_staging,
        staging_version=version if decision.promote else current_version,
    )


def log_segmenter(tracker: Tracker, network: Any, example: Any, metadata: Mapping[str, Any], *,
                  name: str = "model") -> Any:
    """Log a segmentation network (pytorch flavour) in ``tracker``'s open run; returns MLflow's
    ModelInfo (None from a tracker that keeps no models).

    The model carries a tensor signature (``(-1, 1, D, H, W)`` float32 in, logits
    ``(-1, 2, D, H, W)`` out) inferred on ``example`` (one preprocessed crop, also the input
    example), its ``metadata`` (the inference settings ``bonemet predict`` needs), the
    ``bonemet`` package as code (the network's classes are pickled) and the installed versions
    of what it imports as requirements.
    """
    import tempfile

    import numpy as np
    from mlflow.models import infer_signature

    from bonemet.registry.environment import segmenter_requirements
    from bonemet.registry.pyfunc import bonemet_code
    from bonemet.segmentation.networks import example_logits

    example = np.asarray(example, dtype=np.float32)
    signature = infer_signature(example, example_logits(network, example))
    with tempfile.TemporaryDirectory() as tmp:
        return tracker.log_model(
            network, name, flavor="pytorch", signature=signature, input_example=example, metadata=dict(metadata),
            pip_requirements=segmenter_requirements(network), code_paths=[bonemet_code(tmp)],
            serialization_format="pickle",  # pt2 (torch.export) would need a traced example per shape
        )


def register_segmenter(result: Any, *, parent_id: str | None, decision: Any, example: Any, register: bool,
                       tracker: MlflowTracker) -> str | None:
    """Log the best fold's model of a :class:`bonemet.segmentation.pipeline.SegmentationResult` (by
    validation Dice) in ``tracker``'s open run ``parent_id``, with its inference settings as
    metadata; when ``register``, make it a new version of ``result.spec.model_name`` in the
    tracker's store (tagged with the tracker's DVC experiment, ``dvc_exp``, when it has one) and
    give it ``spec.alias`` when the gate's ``decision`` promotes it. Returns the version (None: not
    registered)."""
    from bonemet.segmentation.networks import network_kwargs

    spec, cv, network = result.spec, result.cv, result.spec.model
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in network_kwargs(spec).items()}
    metadata = {"network": network, "network_kwargs": kwargs, **result.settings.to_metadata(),
                "source_fold": cv.best_fold, "source_run_id": cv.best_run_id or ""}
    tracker.log_dict(metadata, "model_metadata.json")
    info = log_segmenter(tracker, cv.best_model.eval(), example, metadata, name="model")
    if not register or parent_id is None:
        return None
    version = register_model(
        tracker.client, info, spec.model_name,
        description=f"{network} segmentation model from fold {cv.best_fold} (best validation Dice) of the "
                    f"ten-fold run; input: a CT preprocessed as in metadata['preprocess']. Gate: {decision.reason}.",
        tags={"network": network, "profile": spec.profile, "source_fold": str(cv.best_fold),
              "gate_decision": "promote" if decision.promote else "hold", "gate_reason": decision.reason,
              **{k: v for k, v in tracker.default_tags.items() if k == "dvc_exp"}},
    )
    if decision.promote:
        set_alias(tracker.client, spec.model_name, spec.alias, version)
    else:
        log.warning("%s version %s registered without the alias '%s': %s", spec.model_name, version, spec.alias,
                    decision.reason)
    return version
