"""`bonemet evaluate`: the whole classification pipeline over repeated random splits.

A stage of its own, after `train`, rather than a section of it: Table 1 (the committed split,
the study's table) stays quick to reproduce and to compare on its own, while the repeats, the
expensive part, rerun only when what they depend on changes and run in parallel processes.
Repeat 0 is read back from the train stage's outputs, so it is Table 1 exactly.

The model of each repeat (``chosen``) is the one the registered rule picks on that repeat's
training set (``register.model``, as the train stage recorded it in ``models/index.json``): the
chosen model's interval is the interval of what is registered, and no choice reads a test set.

Writes ``evaluate.out_dir``/``repeated.json`` (per model and for the per-repeat chosen model:
mean test AUC with the corrected resampled t interval and the percentile range, mean
sensitivity / specificity / accuracy at the model's threshold, how often chosen; the registered
model and its rule; the family with the highest mean test AUC, which the register stage's gate
compares with; on a synthetic cohort the LLR and the paired gap), ``repeated.csv`` (one row per
repeat and model) and ``summary.json`` (the handful of headline numbers `dvc exp show` and `dvc
metrics diff` compare).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")


def _read_json(path: Path, hint: str) -> dict[str, Any]:
    from bonemet.modeling.training import TrainingInputError

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TrainingInputError(f"{path} cannot be read ({exc}): {hint}") from exc


def run(args: argparse.Namespace) -> int:
    from bonemet.data.manifest import manifest_sites
    from bonemet.data.synthetic import read_cohort_ceiling
    from bonemet.modeling.repeated import evaluate_repeated
    from bonemet.modeling.training import read_feature_tables
    from bonemet.splits import read_splits
    from bonemet.stages._common import cohort_input, mlflow_tracker, pseudonym_key, specs_from
    from bonemet.tracking import NullTracker
    from bonemet.tracking.provenance import feature_datasets

    params = specs_from(args)
    ev, train = params.evaluate, params.train
    primary, paired, primary_name, _ = read_feature_tables(params.radiomics.out_dir, train.feature_source)
    _, case_llr = read_cohort_ceiling(params.data.cohort_dir)
    sites = manifest_sites(params.data.cohort_dir, pseudonym_key=pseudonym_key(params)) \
        if params.select.harmonize.enabled else None
    tracker = NullTracker() if args.no_tracking else mlflow_tracker(
        params, ev.experiment, long_running=True,
        inputs=[cohort_input(params), *feature_datasets(params.radiomics.out_dir, [primary_name], "training")])
    evaluate_repeated(
        primary, paired, committed=read_splits(params.split.out),
        table1=_read_json(Path(train.metrics_dir) / "table1.json", "run `bonemet train` first"),
        index=_read_json(Path(train.out_dir) / "index.json", "run `bonemet train` first"),
        select=params.select, train=train, evaluate=ev, test_size=params.split.test_size,
        n_folds=params.split.n_folds, seed=params.seed, feature_source=primary_name,
        segmentation_json=params.segment.metrics, out_dir=ev.out_dir, case_llr=case_llr, sites=sites,
        tracker=tracker, show_progress=not args.no_progress)
    return 0
