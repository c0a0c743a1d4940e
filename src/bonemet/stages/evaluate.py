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
    import pandas as pd

    from bonemet.data.manifest import manifest_sites
    from bonemet.data.synthetic import read_cohort_ceiling
    from bonemet.modeling.repeated import (
        best_by_repeats,
        committed_repeat,
        headline,
        repeats_table,
        run_repeats,
        split_baseline_auc,
        summarize_repeats,
    )
    from bonemet.modeling.training import read_feature_tables
    from bonemet.splits import read_splits, repeated_splits
    from bonemet.stages._common import cohort_input, feature_inputs, mlflow_tracker, pseudonym_key, specs_from
    from bonemet.tracking import NullTracker, finite_metrics
    from bonemet.utils import atomic_path, json_rounded, write_json

    params = specs_from(args)
    ev, train = params.evaluate, params.train
    primary, paired, primary_name, _ = read_feature_tables(train.features_dir, train.feature_source)
    committed = read_splits(params.split.out)
    table1 = _read_json(Path(train.metrics_dir) / "table1.json", "run `bonemet train` first")
    index = _read_json(Path(train.out_dir) / "index.json", "run `bonemet train` first")
    _, case_llr = read_cohort_ceiling(params.data.cohort_dir)
    rule = index.get("registered_rule")
    if rule is None or "registered_model" not in index:
        from bonemet.modeling.training import TrainingInputError

        raise TrainingInputError(f"{Path(train.out_dir) / 'index.json'} names no registered model (written by an older "
                                 "bonemet): run `bonemet train` again")
    ids = [str(i) for i in primary["case_id"]]
    labels = [int(v) for v in primary["label"]]
    patients = committed.get("groups")  # the split stage's patients (manifest patient_id), when grouped
    splits = repeated_splits(ids, labels, n_repeats=ev.repeats, test_size=params.split.test_size,
                             n_folds=params.split.n_folds, seed=params.seed,
                             groups=[str(patients[i]) for i in ids] if patients else None)
    sites = manifest_sites(params.data.cohort_dir, pseudonym_key=pseudonym_key(params)) \
        if params.select.harmonize.enabled else None
    tracker = NullTracker() if args.no_tracking else mlflow_tracker(
        params, ev.experiment, long_running=True,
        inputs=[cohort_input(params), *feature_inputs(train.features_dir, [primary_name])])
    with tracker.run("evaluate", tags={"stage": "evaluate", "feature_source": primary_name}):
        tracker.log_params({"repeats": ev.repeats, "seed": params.seed, "test_size": params.split.test_size,
                            "n_folds": params.split.n_folds, "n_jobs": ev.n_jobs})
        baseline_zero = split_baseline_auc(primary, committed, evaluate=ev, inner_folds=train.inner_folds,
                                           seed=params.seed)
        records = [committed_repeat(table1, index, committed, params.seed, baseline_zero)]
        records += run_repeats(primary, paired, splits, first_repeat=1, select=params.select, train=train,
                               evaluate=ev, seed=params.seed, case_llr=case_llr, n_jobs=ev.n_jobs,
                               registered_rule=str(rule), show_progress=not args.no_progress, sites=sites)
        # each repeat's seconds go to its MLflow run, not into the outputs (same inputs, same bytes)
        seconds = {record["repeat"]: record.pop("seconds", None) for record in records}
        summary = summarize_repeats(records, train.models, alpha=ev.alpha)
        registered = str(index["registered_model"])
        repeated = {**summary, "feature_source": primary_name, "registered_model": registered,
                    "registered_rule": rule, "registered_by": index.get("registered_by", rule),
                    "best_cv_model": index.get("best_model"),
                    "best_repeated_model": best_by_repeats(summary, train.models), "repeats": records}
        headline = headline(repeated, index, table1, Path(params.segment.metrics))
        out = Path(ev.out_dir)
        write_json(out / "repeated.json", json_rounded(repeated))
        table = repeats_table(records)
        with atomic_path(out / "repeated.csv") as tmp:
            table.round(6).to_csv(tmp, index=False)
        write_json(out / "summary.json", json_rounded(headline))
        for record in records:
            with tracker.run(f"repeat-{record['repeat']}", tags={"repeat": str(record["repeat"]),
                                                                  "chosen": record["chosen"]}, nested=True):
                tracker.log_params({"seed": record["seed"], "n_train": record["n_train"], "n_test": record["n_test"]})
                tracker.log_metrics(finite_metrics({f"{m}_{k}": v for m, values in record["models"].items()
                                             for k, v in values.items()}
                                            | {"chosen_auc": record["models"][record["chosen"]]["auc"],
                                               "llr_auc": record["llr_auc"],
                                               "chosen_minus_llr": record["chosen_minus_llr"],
                                               "baseline_auc": record["baseline_auc"],
                                               "chosen_minus_baseline": record["chosen_minus_baseline"],
                                               "seconds": seconds[record["repeat"]]}))
        tracker.log_metrics(finite_metrics({k: v for k, v in headline.items() if isinstance(v, int | float)}))
        tracker.set_tags({"registered_model": registered, "registered_rule": str(rule),
                          "best_repeated_model": repeated["best_repeated_model"]})
        tracker.log_table(pd.DataFrame(table), "repeated.csv")
        tracker.log_artifact(out / "repeated.json")
        tracker.log_artifact(out / "summary.json")
    chosen = summary["chosen"]["auc"]
    if "baseline" in summary:
        diff = summary["baseline"]["chosen_minus_baseline"]
        log.info("plain baseline (L1 logistic regression on every feature) over the same splits: test AUC %.3f; "
                 "registered minus it %+.3f (%+.3f to %+.3f)", summary["baseline"]["auc"]["mean"], diff["mean"],
                 diff["lo"], diff["hi"])
    log.info("repeated evaluation over %d splits: registered model %s (register.model %s) test AUC %.3f (%.3f-%.3f)%s; "
             "highest mean test AUC: %s", len(records), registered, rule, chosen["mean"], chosen["lo"], chosen["hi"],
             "" if "llr" not in summary else
             f", minus the Bayes LLR {summary['llr']['chosen_minus_llr']['mean']:+.3f} "
             f"({summary['llr']['chosen_minus_llr']['lo']:+.3f} to {summary['llr']['chosen_minus_llr']['hi']:+.3f})",
             repeated["best_repeated_model"])
    return 0
