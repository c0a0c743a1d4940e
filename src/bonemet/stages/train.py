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
    from bonemet.splits import read_splits
    from bonemet.stages._common import (
        cohort_input,
        feature_inputs,
        mlflow_tracker,
        pseudonym_key,
        segmentation_bias_tags,
        specs_from,
    )
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
    splits = read_splits(args.splits or params.split.out)
    bayes_auc, case_llr = read_cohort_ceiling(params.data.cohort_dir)
    sites = manifest_sites(params.data.cohort_dir, pseudonym_key=pseudonym_key(params)) \
        if params.select.harmonize.enabled else None
    # the segmentation's Dice gap between the labels, on the train run and every model run
    bias = segmentation_bias_tags(params) if primary_name == "auto" else {}
    tracker = NullTracker() if args.no_tracking else mlflow_tracker(
        params, train.experiment, long_running=True, tags=bias,
        inputs=[cohort_input(params), *feature_inputs(features_dir, [primary_name, paired_name])])
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
    write_domains({name: r.pipeline for name, r in results.models.items()}, primary, splits, train, seed=params.seed,
                  sites=sites)
    return 0


def write_domains(pipelines, primary, splits, train, *, seed: int, sites=None) -> dict:
    """Fit and write each model's training domain (``<model>.domain.skops``, ``domain.json``).

    The domain is fitted on the training cases of ``splits`` as a served row holds them (the
    primary source's feature columns, and the ``site`` from ``sites`` (case id -> site) when the
    pipeline harmonises per site), its threshold calibrated over ``splits``' ``train_folds``;
    spacing and intensity ranges come from ``train.domain.validation_report`` when it exists.
    """
    import numpy as np

    from bonemet.modeling.domain import domain_file, fit_training_domain, report_measures
    from bonemet.modeling.persistence import save_pipeline
    from bonemet.modeling.training import ID_COLUMN, feature_columns
    from bonemet.utils import write_json

    spec = train.domain
    table = primary.set_index(primary[ID_COLUMN].astype(str))
    train_ids = [str(i) for i in splits["train"]]
    X = table.loc[train_ids, feature_columns(primary)].astype(np.float64)
    if sites is not None:
        from bonemet.data.manifest import SITE_COLUMN

        X[SITE_COLUMN] = [str(sites[i]) for i in train_ids]
    folds = [int(splits["train_folds"][i]) for i in train_ids]
    report = Path(spec.validation_report)
    images = None
    if report.is_file():
        images = report_measures(json.loads(report.read_text(encoding="utf-8")), train_ids)
    else:
        log.warning("no validation report at %s: the models' domain has no spacing or intensity range", report)
    out_dir = Path(train.out_dir)
    summary = {}
    for name, pipeline in pipelines.items():
        domain = fit_training_domain(pipeline, X, folds, spec, seed=seed, images=images)
        save_pipeline(domain, out_dir / domain_file(name))
        summary[name] = domain.summary()
        log.info("%s: training domain (%s) flags %.1f %% of training cases out of fold", name, spec.method,
                 100 * domain.oof_flag_rate_)
    write_json(out_dir / "domain.json", summary)
    return summary
