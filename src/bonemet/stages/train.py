"""`bonemet train`: ICC/LASSO selection, eight Optuna-tuned classifiers, ten-fold CV, Table 1."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features", default=None, help="feature tables folder (default: params train.features_dir)")
    parser.add_argument("--splits", default=None, help="splits JSON (default: params split.out)")
    parser.add_argument("--source", default=None, choices=["auto", "manual"],
                        help="train on features of these masks (default: params train.feature_source)")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")


def run(args: argparse.Namespace) -> int:
    from bonemet.data.manifest import manifest_sites
    from bonemet.data.synthetic import read_cohort_ceiling
    from bonemet.modeling.classifiers import check_hyperparameters
    from bonemet.modeling.training import read_feature_tables, run_training
    from bonemet.stages._common import cohort_input, feature_inputs, mlflow_tracker, pseudonym_key, specs_from
    from bonemet.tracking import NullTracker
    from bonemet.utils import seed_everything

    params = specs_from(args)
    train = params.train
    for model in train.models:  # a misspelt hyperparameter fails here, not after an hour of tuning
        check_hyperparameters(model, train.fixed_params.get(model, {}), f"train.fixed_params.{model}")
        check_hyperparameters(model, train.search_space.get(model, {}), f"train.search_space.{model}")
    seed_everything(params.seed)
    source = args.source or train.feature_source
    features_dir = Path(args.features or train.features_dir)
    primary, paired, primary_name, paired_name = read_feature_tables(features_dir, source)
    splits = json.loads(Path(args.splits or params.split.out).read_text(encoding="utf-8"))
    bayes_auc, case_llr = read_cohort_ceiling(params.data.cohort_dir)
    sites = manifest_sites(params.data.cohort_dir, pseudonym_key=pseudonym_key(params)) \
        if params.select.harmonize.enabled else None
    tracker = NullTracker() if args.no_tracking else mlflow_tracker(
        params, train.experiment, long_running=True,
        inputs=[cohort_input(params), *feature_inputs(features_dir, [primary_name, paired_name])])
    log.info("training on %s features (ICC paired with %s), %d cases x %d columns", primary_name, paired_name,
             len(primary), primary.shape[1] - 2)
    results = run_training(
        primary, paired, splits, select=params.select, train=train, evaluate=params.evaluate, seed=params.seed,
        feature_source=primary_name, tracker=tracker, bayes_auc=bayes_auc, case_llr=case_llr, sites=sites,
    )
    best = results.models[results.best_model]
    log.info("best model %s: CV AUC %.3f, test AUC %.3f", results.best_model, best.cv_auc_mean,
             best.test_metrics["auc"])
    return 0
