"""`bonemet train`: ICC/LASSO selection, eight Optuna-tuned classifiers, ten-fold CV, Table 1.

Table 1 and ``models/index.json`` name the model ``register.model`` registers (a family, or
``best_cv``: the highest CV AUC on the training set) and the best by CV when that is another.

Besides the library's outputs (:func:`bonemet.modeling.training.run_training`), the stage records
the domain of each model's training cases (``train.domain``; :mod:`bonemet.modeling.domain`):
``<train.out_dir>/<model>.domain.skops``, summarised in ``domain.json``; the register stage
stores it with the registered model.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features", default=None, help="feature tables folder (default: params radiomics.out_dir)")
    parser.add_argument("--splits", default=None, help="splits JSON (default: params split.out)")
    parser.add_argument("--source", default=None, choices=["auto", "manual"],
                        help="train on features of these masks (default: params train.feature_source)")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")


def run(args: argparse.Namespace) -> int:
    from bonemet.data.manifest import manifest_sites
    from bonemet.data.synthetic import read_cohort_ceiling
    from bonemet.modeling.classifiers import check_hyperparameters
    from bonemet.modeling.training import read_feature_tables, run_training, write_training_domains
    from bonemet.splits import read_splits
    from bonemet.stages._common import cohort_input, mlflow_tracker, pseudonym_key, specs_from
    from bonemet.tracking import NullTracker
    from bonemet.tracking.provenance import feature_datasets, segmentation_bias_tags
    from bonemet.utils import seed_everything
    from bonemet.validation import REPORT_FILE

    params = specs_from(args)
    train = params.train
    for model in train.models:  # a misspelt hyperparameter fails here, not after an hour of tuning
        check_hyperparameters(model, train.fixed_params.get(model, {}), f"train.fixed_params.{model}")
        check_hyperparameters(model, train.search_space.get(model, {}), f"train.search_space.{model}")
    seed_everything(params.seed)
    source = args.source or train.feature_source
    features_dir = Path(args.features or params.radiomics.out_dir)
    primary, paired, primary_name, paired_name = read_feature_tables(features_dir, source)
    splits = read_splits(args.splits or params.split.out)
    bayes_auc, case_llr = read_cohort_ceiling(params.data.cohort_dir)
    sites = manifest_sites(params.data.cohort_dir, pseudonym_key=pseudonym_key(params)) \
        if params.select.harmonize.enabled else None
    # the segmentation's Dice gap between the labels, on the train run and every model run
    bias = segmentation_bias_tags(params.segment.metrics, params.segment.bias.max_dice_gap) if primary_name == "auto" else {}
    tracker = NullTracker() if args.no_tracking else mlflow_tracker(
        params, train.experiment, long_running=True, tags=bias,
        inputs=[cohort_input(params), *feature_datasets(features_dir, [primary_name, paired_name], "training")])
    log.info("training on %s features (ICC paired with %s), %d cases x %d columns", primary_name, paired_name,
             len(primary), primary.shape[1] - 2)
    results = run_training(
        primary, paired, splits, select=params.select, train=train, evaluate=params.evaluate, seed=params.seed,
        feature_source=primary_name, registered_rule=params.registration.model, tracker=tracker, bayes_auc=bayes_auc,
        case_llr=case_llr, sites=sites,
    )
    registered = results.models[results.registered_model]
    log.info("registered model %s (register.model %s): CV AUC %.3f, test AUC %.3f; best by CV: %s",
             results.registered_model, params.registration.model, registered.cv_auc_mean,
             registered.test_metrics["auc"], results.best_model)
    write_training_domains({name: r.pipeline for name, r in results.models.items()}, primary, splits, train,
                           validation_report=Path(params.validation.out_dir) / REPORT_FILE, seed=params.seed,
                           sites=sites)
    return 0
