"""`bonemet train`: ICC/LASSO selection, eight Optuna-tuned classifiers, ten-fold CV, Table 1."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

#: The other source of each pair; the ICC compares a source with its pair.
PAIRS = {"auto": "manual", "manual": "auto"}
#: A synthetic cohort's latents and Bayes ceiling, next to its manifest.
COHORT_JSON = "cohort.json"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features", default=None, help="feature tables folder (default: params train.features_dir)")
    parser.add_argument("--splits", default=None, help="splits JSON (default: params split.out)")
    parser.add_argument("--source", default=None, choices=sorted(PAIRS),
                        help="train on features of these masks (default: params train.feature_source)")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")


def _read_tables(features_dir: Path, source: str):
    """Primary and paired feature tables; 'auto' falls back to annotator features when auto is missing."""
    import pandas as pd

    from bonemet.modeling.training import MissingFeatureTableError

    def path_of(name: str) -> Path:
        return features_dir / f"{name}.parquet"

    primary_name, paired_name = source, PAIRS[source]
    for name in (primary_name, paired_name):
        if name == "auto" and not path_of("auto").is_file() and path_of("annotator").is_file():
            log.warning("%s missing: using annotator-mask features as the automatic-mask stand-in",
                        path_of("auto"))
            if name == primary_name:
                primary_name = "annotator"
            else:
                paired_name = "annotator"
    for name in (primary_name, paired_name):
        if not path_of(name).is_file():
            raise MissingFeatureTableError(f"feature table {path_of(name)} not found (run `bonemet extract` first)")
    return pd.read_parquet(path_of(primary_name)), pd.read_parquet(path_of(paired_name)), primary_name, paired_name


def run(args: argparse.Namespace) -> int:
    from bonemet.modeling.classifiers import check_hyperparameters
    from bonemet.modeling.training import run_training
    from bonemet.stages._common import mlflow_tracker, specs_from
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
    primary, paired, primary_name, paired_name = _read_tables(features_dir, source)
    splits = json.loads(Path(args.splits or params.split.out).read_text(encoding="utf-8"))
    bayes_auc, case_llr = _cohort_ceiling(Path(params.data.cohort_dir) / COHORT_JSON)
    sites = None
    if params.select.harmonize.enabled:
        from bonemet.data.manifest import read_manifest

        sites = {c.case_id: c.site for c in read_manifest(params.data.cohort_dir) if c.site}
    tracker = NullTracker() if args.no_tracking else mlflow_tracker(params, train.experiment)
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


def _cohort_ceiling(cohort_json: Path) -> tuple[float | None, dict[str, float] | None]:
    """A synthetic cohort's Bayes-optimal AUC and each case's latent LLR (``cohort.json``); None for a user's."""
    if not cohort_json.is_file():
        return None, None
    cohort = json.loads(cohort_json.read_text(encoding="utf-8"))
    bayes_auc = cohort.get("bayes_auc")
    case_llr = {str(c["case_id"]): float(c["llr"]) for c in cohort.get("cases", [])
                if "case_id" in c and c.get("llr") is not None} or None
    log.info("cohort ceiling from %s: Bayes-optimal AUC %s", cohort_json, bayes_auc)
    return bayes_auc, case_llr
