"""`bonemet register`: register the classifier ``register.model`` names; gate it to `staging`.

Reads the train stage's outputs (``register.models_dir``: ``index.json`` names the registered
model, by ``register.model``: a family, or ``best_cv``, the highest CV AUC on the training set;
``<model>.skops`` is its tuned pipeline fitted on the committed split's training set, with its
calibration and threshold; ``index.json`` its metrics and feature names;
``<train.metrics_dir>/train_runs.json`` the MLflow runs; ``<model>.domain.skops`` the domain of its
training cases), the evaluate stage's ``register.repeated`` (``repeated.json``: the rule's repeated
estimate, which the gate judges, and every family's) and the feature table (the served model is
checked on its rows, two are the input example);
writes ``register.out``. The model's requirements are the installed versions of what it imports
(:mod:`bonemet.registry.environment`).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="registry metrics JSON (default: params register.out)")
    parser.add_argument("--json", action="store_true",
                        help="print the registration (version, gate decision and reason) as JSON instead of one line")


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from bonemet.modeling import TRAIN_RUNS_FILE
    from bonemet.modeling.domain import domain_file
    from bonemet.modeling.persistence import load_pipeline
    from bonemet.registry.registration import RegistryError, register_classifier
    from bonemet.stages._common import open_store, pseudonym_key, run_tags, segmentation_bias_tags, specs_from
    from bonemet.utils import write_json

    params = specs_from(args)
    reg = params.registration
    models_dir = Path(reg.models_dir)
    train_runs = Path(params.train.metrics_dir) / TRAIN_RUNS_FILE
    try:
        index = json.loads((models_dir / "index.json").read_text(encoding="utf-8"))
        provenance = json.loads(train_runs.read_text(encoding="utf-8"))
        repeated = json.loads(Path(reg.repeated).read_text(encoding="utf-8"))
        classifier = str(index["registered_model"])
        rule = str(index["registered_rule"])
        entry = index["models"][classifier]
        pipeline_path = models_dir / entry["path"]
        domain_path = models_dir / domain_file(classifier)
        if not {"cv_auc_mean", "test_auc", "threshold"} <= set(entry) or "feature_names" not in index:
            raise KeyError("cv_auc_mean, test_auc, threshold or feature_names")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RegistryError(f"{models_dir}/index.json, {train_runs} or {reg.repeated} cannot be read or lack a "
                            f"key ({exc}); run `bonemet train` and `bonemet evaluate` first") from exc
    if rule != reg.model:
        raise RegistryError(f"{models_dir}/index.json was trained for register.model {rule}, params say {reg.model}: "
                            "rerun the train and evaluate stages (`dvc repro`) before registering")
    pipeline = load_pipeline(pipeline_path)
    if not domain_path.is_file():
        raise RegistryError(f"{domain_path} not found (the domain of {classifier}'s training cases): run `bonemet train`")
    domain = load_pipeline(domain_path)
    features = pd.read_parquet(reg.features_file)
    text_columns = [str(c) for c in index.get("extra_input_columns", [])]
    if "site" in text_columns and "site" not in features.columns:  # ComBat: the rows need their site
        from bonemet.data.manifest import manifest_sites

        sites = manifest_sites(params.data.cohort_dir, pseudonym_key=pseudonym_key(params))
        features = features.assign(site=features["case_id"].astype(str).map(sites))
        features = features[features["site"].notna()]
    description_extra = ""
    try:
        description_extra = "\nTable 1:\n" + Path(reg.table1_md).read_text(encoding="utf-8")
    except OSError:
        log.warning("no Table 1 at %s: the model description will not include it", reg.table1_md)
    # beside the decision: the segmentation's Dice gap between the labels, when the model learnt from
    # automatic-mask features
    bias = segmentation_bias_tags(params) if index.get("feature_source") == "auto" else {}
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
        domain=domain,
        check_rows=features,
        text_columns=text_columns,
        min_auc=reg.min_auc,
        min_auc_lower_bound=reg.min_auc_lower_bound,
        min_sensitivity=reg.min_sensitivity,
        min_specificity=reg.min_specificity,
        tolerance=reg.tolerance,
        max_gap_to_best=reg.max_gap_to_best,
        alias=reg.alias,
        description_extra=description_extra,
        tags={**run_tags(params.data.cohort_dir), **bias},
    )
    summary = {**result.to_dict(), **bias}
    summary["promoted"] = int(result.promoted)
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    else:
        print(f"{result.model_name} version {result.version} ({result.classifier}, register.model "
              f"{result.registered_rule}): "
              f"{'promoted to' if result.promoted else 'NOT promoted to'} '{reg.alias}': {result.reason}")
    write_json(args.out or reg.out, summary)
    return 0
