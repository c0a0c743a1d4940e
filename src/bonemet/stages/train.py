"""`bonemet train`: ICC/LASSO selection, eight Optuna-tuned classifiers, ten-fold CV, Table 1."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from bonemet.config import get, section
from bonemet.stages._common import params_from

log = logging.getLogger(__name__)

#: The other source of each pair; the ICC compares a source with its pair.
PAIRS = {"auto": "manual", "manual": "auto"}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features", default=None, help="feature tables folder (default: params train.features_dir)")
    parser.add_argument("--splits", default=None, help="splits JSON (default: params split.out)")
    parser.add_argument("--source", default=None, choices=sorted(PAIRS),
                        help="train on features of these masks (default: params train.feature_source)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow (NullTracker)")


def _read_tables(features_dir: Path, source: str):
    """Primary and paired feature tables; 'auto' falls back to annotator features when auto is missing."""
    import pandas as pd

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
            raise FileNotFoundError(f"feature table {path_of(name)} not found (run `bonemet extract` first)")
    return pd.read_parquet(path_of(primary_name)), pd.read_parquet(path_of(paired_name)), primary_name, paired_name


def run(args: argparse.Namespace) -> int:
    from bonemet.modeling.training import run_training
    from bonemet.stages._common import mlflow_tracker
    from bonemet.tracking import NullTracker
    from bonemet.utils import seed_everything

    params = params_from(args)
    seed = int(get(params, "seed"))
    seed_everything(seed)
    train = section(params, "train")
    source = args.source or str(train.get("feature_source", "auto"))
    if source not in PAIRS:
        raise ValueError(f"train.feature_source: expected one of {sorted(PAIRS)}, found {source!r}")
    features_dir = Path(args.features or train.get("features_dir", "data/features"))
    primary, paired, primary_name, paired_name = _read_tables(features_dir, source)
    splits = json.loads(Path(args.splits or get(params, "split.out")).read_text(encoding="utf-8"))
    cohort_json = Path(get(params, "data.cohort_dir")) / "cohort.json"
    bayes_auc, case_llr = None, None
    if cohort_json.is_file():  # a synthetic cohort: its ceiling and each case's Bayes score
        cohort = json.loads(cohort_json.read_text(encoding="utf-8"))
        bayes_auc = cohort.get("bayes_auc")
        case_llr = {str(c["case_id"]): float(c["llr"]) for c in cohort.get("cases", [])
                    if "case_id" in c and c.get("llr") is not None} or None
        log.info("cohort ceiling from %s: Bayes-optimal AUC %s", cohort_json, bayes_auc)
    tracker = NullTracker() if args.no_mlflow else mlflow_tracker(str(train.get("experiment", "bonemet-classification")))
    log.info("training on %s features (ICC paired with %s), %d cases x %d columns", primary_name, paired_name,
             len(primary), primary.shape[1] - 2)
    results = run_training(
        primary,
        paired,
        splits,
        select_params=section(params, "select"),
        train_params=train,
        evaluate_params=section(params, "evaluate"),
        seed=seed,
        tracker=tracker,
        out_dir=train.get("out_dir", "models"),
        plots_dir=train.get("plots_dir", "plots/classification"),
        metrics_dir=train.get("metrics_dir", "metrics"),
        bayes_auc=bayes_auc,
        feature_source=primary_name,
        case_llr=case_llr,
    )
    best = results.models[results.best_model]
    log.info("best model %s: CV AUC %.3f, test AUC %.3f", results.best_model, best.cv_auc_mean,
             best.test_metrics["auc"])
    return 0
