"""Which step of the study's chain costs test AUC against the plain baseline, and what the masks cost.

Issue 24 §3 (where the chain loses to the plain baseline, which step costs it) and issue 23 §3
(the evaluate stage's repeated splits on manual-mask features too). On the evaluate stage's own
splits (repeat 0: the committed ``splits.json``, seed ``seed``; repeat r >= 1:
:func:`bonemet.splits.repeated_splits`, seed ``seed + r``), for each classifier family in
``--models`` (default: the registered ``svm``), the chain is refitted on each repeat's training
cases with one step changed at a time:

  ``configured``   params as they are (ICC >= 0.9, correlation filter 0.95, LASSO CV lambda "min"
                   at most 20 features, Optuna);
  ``icc_off``      no ICC filter (``select.icc.enabled: false``);
  ``icc_0.75``     ICC threshold 0.75 instead of 0.9;
  ``corr_off``     no correlation filter;
  ``lasso_max5``   LASSO keeps at most 5 features (``select.lasso.max_features``);
  ``lasso_1se``    LASSO lambda by the one-standard-error rule (sparser);
  ``lasso_fixed``  LASSO at the study's fixed lambda 0.0391;
  ``tuning_off``   no Optuna: the classifier's defaults with ``train.fixed_params``
                   (``train.n_trials.<model>: 0``);

and the plain baseline (:mod:`bonemet.modeling.baseline`, what the evaluate stage compares with),
on the automatic-mask features and on the manual-mask features (``train.feature_source``
auto / manual; the ICC pairs each with the other). Everything goes through the library: the
splits (:func:`bonemet.splits.repeated_splits`), the training/test cut
(:func:`~bonemet.modeling.training.split_data`), the selection fitted per fold on training rows
only (:func:`~bonemet.modeling.training.precompute_selection`, the one Pipeline builder), tuning,
CV, calibration, threshold and final fit (:func:`~bonemet.modeling.training.fit_model`, the train
and evaluate stages' function), the baseline (:func:`~bonemet.modeling.baseline.baseline_scores`)
and the interval (:func:`~bonemet.modeling.stats.corrected_resampled_t`, the evaluate stage's
corrected resampled t with ``evaluate.alpha``). So ``configured`` on auto-mask features with
``--models svm`` reproduces the evaluate stage's SVM test AUC repeat by repeat.

Reported per source, model and variant: the mean test AUC over the repeats with its interval, the
paired difference to ``configured`` and to the baseline (same repeats, same test cases), and per
variant the paired difference manual minus auto (the cost of the masks). Seeded, deterministic,
one BLAS thread; the JSON is rewritten after every repeat (a cut-short run keeps what it did).

    # the full run (minutes per repeat on one core), from a project that ran `make run`:
    taskset -c 1 python benchmarks/evaluate_ablation.py --params /tmp/fresh2/params.yaml \\
        --out benchmarks/results/evaluate_ablation.json
    # the quick mode a test runs: a synthetic table made here, 2 repeats, 3 trials (seconds)
    python benchmarks/evaluate_ablation.py --quick --out /tmp/evaluate_ablation_quick.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

_HERE = Path(__file__).resolve().parent
# benchmarks/radiomics.py would shadow PyRadiomics: this folder leaves sys.path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
REPO = _HERE.parent

log = logging.getLogger("benchmarks.evaluate_ablation")

#: name -> (what changes, select changes, train changes (``{model}`` is the family))
VARIANTS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "configured": ("params as they are", {}, {}),
    "icc_off": ("no ICC filter", {"icc.enabled": False}, {}),
    "icc_0.75": ("ICC threshold 0.75", {"icc.threshold": 0.75}, {}),
    "corr_off": ("no correlation filter", {"correlation.enabled": False}, {}),
    "lasso_max5": ("LASSO at most 5 features", {"lasso.max_features": 5}, {}),
    "lasso_1se": ("LASSO lambda by the 1-SE rule", {"lasso.lambda_rule": "1se"}, {}),
    "lasso_fixed": ("LASSO at the study's fixed lambda 0.0391", {"lasso.alpha": 0.0391}, {}),
    "tuning_off": ("no Optuna: default hyperparameters", {}, {"n_trials.{model}": 0}),
}
SOURCES = ("auto", "manual")

# Quick mode: a synthetic table of this many cases and features, few trials and folds.
QUICK_CASES, QUICK_POSITIVE, QUICK_FEATURES, QUICK_REPEATS = 48, 20, 16, 2


def quick_tables(seed: int) -> dict[str, pd.DataFrame]:
    """Two feature tables ("auto", "manual") of :data:`QUICK_CASES` cases: a latent per case shifts
    with the label; each feature is the latent (or noise) plus noise, the automatic masks' copy
    noisier than the manual one, a few features barely reproducible (ICC low)."""
    rng = np.random.default_rng(seed)
    n, p = QUICK_CASES, QUICK_FEATURES
    label = np.zeros(n, dtype=int)
    label[rng.choice(n, QUICK_POSITIVE, replace=False)] = 1
    latent = label * 1.2 + rng.normal(size=n)
    weight = np.where(np.arange(p) % 3 == 0, 1.0, 0.0)
    truth = np.outer(latent, weight) + rng.normal(size=(n, p))
    mask_noise = np.where(np.arange(p) % 4 == 1, 2.0, 0.2)
    ids = [f"case{i:03d}" for i in range(n)]
    tables = {}
    for source, scale in (("manual", 0.5), ("auto", 1.0)):
        values = truth + scale * mask_noise * rng.normal(size=(n, p))
        frame = pd.DataFrame(values, columns=[f"original_firstorder_F{j}" for j in range(p)])
        frame.insert(0, "label", label)
        frame.insert(0, "case_id", ids)
        tables[source] = frame
    return tables


def quick_params(params: Any) -> Any:
    """``params`` shrunk for the quick mode: 3 trials, 3 folds, a short baseline C grid."""
    train = params.train.updated({"inner_folds": 3, "n_trials": {m: 3 for m in params.train.n_trials},
                                  "pruner_startup_trials": 1})
    return params.model_copy(update={
        "train": train,
        "split": params.split.updated({"n_folds": 3}),
        "select": params.select.updated({"lasso.cv": 3}),
        "evaluate": params.evaluate.updated({"baseline.n_cs": 3, "repeats": QUICK_REPEATS}),
    })


def variant_specs(params: Any, variant: str, model: str) -> tuple[Any, Any]:
    """``(select, train)`` of ``variant`` for ``model``: one step changed, through ``Spec.updated``
    (validated like params.yaml)."""
    _, select_changes, train_changes = VARIANTS[variant]
    select = params.select.updated(select_changes) if select_changes else params.select
    train = params.train.updated({"models": [model], "tuning.storage": None, "tuning.workers": 1,
                                  **{k.format(model=model): v for k, v in train_changes.items()}})
    return select, train


def run_repeat(tables: dict[str, tuple[pd.DataFrame, pd.DataFrame]], split: dict[str, Any], *, repeat: int,
               seed: int, params: Any, models: list[str], variants: list[str]) -> dict[str, Any]:
    """One repeat: every source x model x variant refitted on ``split``'s training cases and scored on
    its test cases; the baseline once per source."""
    from bonemet.modeling.baseline import baseline_scores
    from bonemet.modeling.training import (
        assemble_features,
        feature_columns,
        fit_model,
        precompute_selection,
        split_data,
    )
    from bonemet.tracking import NullTracker

    record: dict[str, Any] = {"repeat": repeat, "seed": seed, "n_train": len(split["train"]),
                              "n_test": len(split["test"]), "sources": {}}
    for source, (primary, paired) in tables.items():
        start = time.perf_counter()
        X, y = assemble_features(primary, paired, params.select.icc.paired_prefix)
        X.index = X.index.astype(str)
        data = split_data(X, y.set_axis(X.index), split, feature_columns(primary), params.select.icc.paired_prefix)
        base = baseline_scores(data.X_train[data.primary_cols], data.y_train, data.X_test[data.primary_cols],
                               spec=params.evaluate.baseline, inner_folds=params.train.inner_folds, seed=seed,
                               groups=data.train_groups)
        aucs: dict[str, dict[str, float]] = {m: {} for m in models}
        seconds: dict[str, float] = {"baseline": round(time.perf_counter() - start, 1)}
        selections: dict[str, Any] = {}  # one selection per distinct select spec, shared by models and tuning_off
        for variant in variants:
            t0 = time.perf_counter()
            for model in models:
                select, train = variant_specs(params, variant, model)
                key = select.model_dump_json()
                if key not in selections:
                    selections[key] = precompute_selection(data, select, train.inner_folds, seed, NullTracker())
                inner, outer = selections[key]
                result = fit_model(model, data, inner, outer, select=select, train=train, evaluate=params.evaluate,
                                   seed=seed, tracker=NullTracker())
                aucs[model][variant] = float(result.test_metrics["auc"])
            seconds[variant] = round(time.perf_counter() - t0, 1)
        record["sources"][source] = {"baseline_auc": _auc(data.y_test, base), "auc": aucs, "seconds": seconds}
        log.info("repeat %d %s: baseline %.3f; %s (%.0f s)", repeat, source, record["sources"][source]["baseline_auc"],
                 "; ".join(f"{m} " + ", ".join(f"{v} {a:.3f}" for v, a in aucs[m].items()) for m in models),
                 time.perf_counter() - start)
    return record


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score)) if len(np.unique(y)) == 2 else math.nan


def summarize(records: list[dict[str, Any]], *, models: list[str], variants: list[str], alpha: float) -> dict[str, Any]:
    """Per source, model and variant: mean test AUC with the corrected resampled t interval, and the
    paired differences to ``configured`` and to the baseline; per model and variant the paired
    difference manual minus auto (when both sources ran). Each variant over the repeats that ran it
    (``n`` of its intervals; a run continued with ``--append`` may run fewer variants)."""
    from bonemet.modeling.stats import corrected_resampled_t

    n_train = int(round(float(np.mean([r["n_train"] for r in records]))))
    n_test = int(round(float(np.mean([r["n_test"] for r in records]))))

    def interval(values: list[float], bounds: tuple[float, float]) -> dict[str, float]:
        return corrected_resampled_t(values, n_train=n_train, n_test=n_test, alpha=alpha, bounds=bounds)

    def has(row: dict[str, Any], model: str, variant: str) -> bool:
        return variant in row["auc"].get(model, {})

    sources = [s for s in SOURCES if all(s in r["sources"] for r in records)]
    out: dict[str, Any] = {"n_repeats": len(records), "n_train": n_train, "n_test": n_test, "alpha": alpha,
                           "sources": {}}
    for source in sources:
        rows = [r["sources"][source] for r in records]
        entry: dict[str, Any] = {"baseline": {"auc": interval([row["baseline_auc"] for row in rows], (0.0, 1.0))},
                                 "models": {}}
        for model in models:
            entry["models"][model] = {}
            for variant in variants:
                held = [row for row in rows if has(row, model, variant)]
                auc = [row["auc"][model][variant] for row in held]
                conf = [row["auc"][model]["configured"] for row in held]
                base = [row["baseline_auc"] for row in held]
                entry["models"][model][variant] = {
                    "auc": interval(auc, (0.0, 1.0)),
                    "minus_configured": interval([a - c for a, c in zip(auc, conf, strict=True)], (-1.0, 1.0)),
                    "minus_baseline": interval([a - b for a, b in zip(auc, base, strict=True)], (-1.0, 1.0)),
                }
        out["sources"][source] = entry
    if len(sources) == 2:
        def diff(get, keep=lambda s: True) -> dict[str, float]:
            both = [(r["sources"]["manual"], r["sources"]["auto"]) for r in records
                    if keep(r["sources"]["manual"]) and keep(r["sources"]["auto"])]
            return interval([get(m) - get(a) for m, a in both], (-1.0, 1.0))

        out["manual_minus_auto"] = {
            "baseline": diff(lambda s: s["baseline_auc"]),
            **{model: {v: diff(lambda s, m=model, v=v: s["auc"][m][v], lambda s, m=model, v=v: has(s, m, v))
                       for v in variants} for model in models},
        }
    return out


def table_lines(summary: dict[str, Any], *, models: list[str], variants: list[str]) -> list[str]:
    """The summary as markdown rows (what benchmarks/evaluate.md shows)."""
    def ci(d: dict[str, float], signed: bool = False) -> str:
        f = "{:+.3f}" if signed else "{:.3f}"
        return f"{f.format(d['mean'])} ({f.format(d['lo'])} to {f.format(d['hi'])})"

    lines = ["| source | model | variant | repeats | test AUC | minus configured | minus baseline | manual minus auto |",
             "|---|---|---|---|---|---|---|---|"]
    mma = summary.get("manual_minus_auto", {})
    for source, entry in summary["sources"].items():
        for model in models:
            for variant in variants:
                v = entry["models"][model][variant]
                lines.append(f"| {source} | {model} | {variant} | {v['auc']['n']} | {ci(v['auc'])} | "
                             f"{'' if variant == 'configured' else ci(v['minus_configured'], True)} | "
                             f"{ci(v['minus_baseline'], True)} | "
                             f"{ci(mma[model][variant], True) if mma and source == 'manual' else ''} |")
        lines.append(f"| {source} | baseline | L1 logreg, all features | {entry['baseline']['auc']['n']} | "
                     f"{ci(entry['baseline']['auc'])} | | | "
                     f"{ci(mma['baseline'], True) if mma and source == 'manual' else ''} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    from threadpoolctl import threadpool_limits

    from bonemet.config import load_specs
    from bonemet.modeling.training import read_feature_tables
    from bonemet.splits import make_splits, read_splits, repeated_splits

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=str(REPO / "params.yaml"),
                        help="the project's params.yaml; its relative paths (features, splits) are read from its folder")
    parser.add_argument("--features-dir", help="default: train.features_dir of --params")
    parser.add_argument("--out", help="the result JSON (default: benchmarks/results/evaluate_ablation.json; "
                        "with --quick: evaluate_ablation_quick.json in the temporary folder)")
    parser.add_argument("--repeats", type=int, help="default: evaluate.repeats")
    parser.add_argument("--models", default="svm", help="comma-separated families (default svm, the registered one)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of " + ", ".join(VARIANTS))
    parser.add_argument("--sources", default=",".join(SOURCES))
    parser.add_argument("--append", action="store_true",
                        help="continue --out: keep its repeats, run the ones it lacks (with these --variants)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a synthetic table of {QUICK_CASES} cases made here, {QUICK_REPEATS} repeats (a test runs this)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    log.setLevel(logging.INFO)
    warnings.filterwarnings("ignore")
    models = [m for m in args.models.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    sources = [s for s in args.sources.split(",") if s]
    unknown = sorted(set(variants) - set(VARIANTS)) + sorted(set(sources) - set(SOURCES))
    if unknown or "configured" not in variants:
        parser.error(f"unknown variant or source {unknown}" if unknown else "the variants must include configured")
    params = load_specs(args.params)
    root = Path(args.params).resolve().parent
    if args.quick:
        params = quick_params(params)
        quick = quick_tables(params.seed)
        tables = {s: (quick[s], quick["manual" if s == "auto" else "auto"]) for s in sources}
        primary = quick["auto"]
        ids, labels = [str(i) for i in primary["case_id"]], [int(v) for v in primary["label"]]
        committed = make_splits(ids, labels, test_size=params.split.test_size, n_folds=params.split.n_folds,
                                seed=params.seed)
    else:
        features_dir = Path(args.features_dir) if args.features_dir else root / params.train.features_dir
        tables = {}
        for source in sources:
            first, pair, name, pair_name = read_feature_tables(features_dir, source)
            log.info("%s: %s.parquet, ICC paired with %s.parquet (%d cases)", source, name, pair_name, len(first))
            tables[source] = (first, pair)
        primary = tables[sources[0]][0]
        ids, labels = [str(i) for i in primary["case_id"]], [int(v) for v in primary["label"]]
        committed = read_splits(root / params.split.out)
    repeats = args.repeats or params.evaluate.repeats
    patients = committed.get("groups")
    splits = [committed] + repeated_splits(ids, labels, n_repeats=repeats, test_size=params.split.test_size,
                                           n_folds=params.split.n_folds, seed=params.seed,
                                           groups=[str(patients[i]) for i in ids] if patients else None)
    result: dict[str, Any] = {
        "quick": bool(args.quick), "params": str(Path(args.params).resolve()), "models": models,
        "variants": {v: VARIANTS[v][0] for v in variants}, "sources": sources, "repeats_planned": repeats,
        "seed": params.seed, "n_cases": len(ids), "records": [],
    }
    out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "evaluate_ablation_quick.json" if args.quick
                                           else REPO / "benchmarks" / "results" / "evaluate_ablation.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    done: set[int] = set()
    if args.append and out.is_file():
        previous = json.loads(out.read_text(encoding="utf-8"))
        if previous["models"] != models or previous["seed"] != params.seed or previous["quick"] != result["quick"]:
            parser.error(f"--append: {out} holds another run (models, seed or quick mode differ)")
        result["records"] = previous["records"]
        result["variants"] = {**previous["variants"], **result["variants"]}
        result["seconds_before"] = previous.get("seconds", 0.0) + previous.get("seconds_before", 0.0)
        done = {int(r["repeat"]) for r in result["records"]}
        log.info("--append: %s holds repeat(s) %s", out, sorted(done))
    all_variants = list(result["variants"])
    started = time.perf_counter()
    with threadpool_limits(limits=1):
        for r, split in enumerate(splits):
            if r in done:
                continue
            t0 = time.perf_counter()
            record = run_repeat(tables, split, repeat=r, seed=params.seed + r, params=params, models=models,
                                variants=variants)
            record["seconds"] = round(time.perf_counter() - t0, 1)
            result["records"].append(record)
            result["records"].sort(key=lambda rec: rec["repeat"])
            result["summary"] = summarize(result["records"], models=models, variants=all_variants,
                                          alpha=params.evaluate.alpha)
            result["seconds"] = round(time.perf_counter() - started, 1)
            out.write_text(json.dumps(result, indent=1, allow_nan=True) + "\n", encoding="utf-8")
            log.info("repeat %d done in %.0f s; %s written", r, record["seconds"], out)
    summary = summarize(result["records"], models=models, variants=all_variants, alpha=params.evaluate.alpha)
    print("\n".join(table_lines(summary, models=models, variants=all_variants)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
