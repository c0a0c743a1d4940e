"""`bonemet register`: register the classifier ``register.model`` names; gate it to `staging`.

Reads the train and evaluate stages' outputs (``train.out_dir``, ``train.metrics_dir``,
``evaluate.out_dir``: :func:`bonemet.registry.trained.read_trained_classifier`) and the feature
table of ``train.feature_source`` in ``radiomics.out_dir`` (the served model is checked on its
rows, two are the input example); writes ``register.out``. The model's requirements are the installed versions of what it imports
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

    from bonemet.modeling import REPEATED_FILE, TABLE1_MD, TRAIN_RUNS_FILE
    from bonemet.registry.registration import register_classifier
    from bonemet.registry.trained import read_trained_classifier
    from bonemet.stages._common import mlflow_tracker, pseudonym_key, specs_from
    from bonemet.tracking.provenance import segmentation_bias_tags
    from bonemet.utils import write_json

    params = specs_from(args)
    reg, train = params.registration, params.train
    trained = read_trained_classifier(train.out_dir, Path(train.metrics_dir) / TRAIN_RUNS_FILE,
                                      Path(params.evaluate.out_dir) / REPEATED_FILE, Path(train.metrics_dir) / TABLE1_MD,
                                      registered_rule=reg.model)
    features = pd.read_parquet(Path(params.radiomics.out_dir) / f"{train.feature_source}.parquet")
    if "site" in trained.text_columns and "site" not in features.columns:  # ComBat: the rows need their site
        from bonemet.data.manifest import manifest_sites

        sites = manifest_sites(params.data.cohort_dir, pseudonym_key=pseudonym_key(params))
        features = features.assign(site=features["case_id"].astype(str).map(sites))
        features = features[features["site"].notna()]
    # beside the decision: the segmentation's Dice gap between the labels, when the model learnt from
    # automatic-mask features
    auto = trained.feature_source == "auto"
    bias = segmentation_bias_tags(params.segment.metrics, params.segment.bias.max_dice_gap) if auto else {}
    tracker = mlflow_tracker(params, reg.experiment, tags=bias)  # its run tags: provenance and the gap
    result = register_classifier(
        tracker=tracker, model_name=reg.model_name,
        classifier=trained.classifier, index=trained.index, provenance=trained.provenance, repeated=trained.repeated,
        pipeline=trained.pipeline, domain=trained.domain, check_rows=features, text_columns=trained.text_columns,
        min_auc=reg.min_auc, min_auc_lower_bound=reg.min_auc_lower_bound, min_sensitivity=reg.min_sensitivity,
        min_specificity=reg.min_specificity, tolerance=reg.tolerance, max_gap_to_best=reg.max_gap_to_best,
        alias=reg.alias, description_extra="\nTable 1:\n" + trained.table1 if trained.table1 else "",
        tags=tracker.default_tags,
    )
    summary = {**result.to_dict(), **bias, "promoted": int(result.promoted)}
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    else:
        print(f"{result.model_name} version {result.version} ({result.classifier}, register.model "
              f"{result.registered_rule}): "
              f"{'promoted to' if result.promoted else 'NOT promoted to'} '{reg.alias}': {result.reason}")
    write_json(args.out or reg.out, summary)
    return 0
