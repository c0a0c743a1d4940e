"""How far the study's pipeline sits from the Bayes AUC in expectation, not on one split.

Table 1 reports one 70/30 split: 54 test cases, an AUC with a CI of about +-0.1. This script
asks the same question over many splits and several independent synthetic cohorts:

  * ``splits``: for each cohort folder, ``--repeats`` stratified 70/30 splits; on each, the
    study's selection (params ``select``: ICC, correlation filter, scaler, LASSO) fitted on the
    training part with a fixed logistic regression (C = 0.1, the cheap stand-in for the tuned
    models: on the default split it scores 0.836, the eight tuned models 0.803-0.838), and the latents' own
    LLR (the Bayes classifier) on the same test cases. Prints mean +- sd of both and the mean
    gap to the cohort's Bayes AUC.
  * ``curve``: a learning curve: one fixed test set of ``--test-size`` cases, training sets of
    ``--train-sizes`` cases drawn from the rest (``--repeats`` draws each): does the distance to
    the LLR shrink with more training cases (learning) or stay (information in the features)?

A cohort folder holds ``raw/cohort.json`` (from ``bonemet synth``) and ``features/<source>.parquet``
plus the paired source's table (``bonemet extract``). An independent cohort with annotator masks
standing in for MISSU masks (no segmentation run needed), e.g. seed 7:

    bonemet synth dev7/raw --seed 7 [--n 600]
    # params copy with data.cohort_dir dev7/raw, radiomics.sources [manual, annotator]
    bonemet extract --params dev7/params.yaml --out dev7/features --no-tracking

    python benchmarks/cohort_variation.py splits data dev7 --source auto annotator
    python benchmarks/cohort_variation.py curve dev600 --source annotator --train-sizes 62 124 250
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedShuffleSplit, train_test_split

from bonemet.modeling.training import assemble_features
from latent_recovery import PAIRED, study_model  # sibling script (benchmarks/ is on sys.path)

log = logging.getLogger("benchmarks.cohort_variation")

TEST_FRACTION = 0.3


def load_cohort(folder: Path, source: str, paired_prefix: str = "paired__",
                sites: dict[str, str] | None = None) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, float]:
    """Feature matrix (with the paired columns, and ``site`` when ``sites`` are given), labels,
    each case's LLR, and the Bayes AUC."""
    doc = json.loads((folder / "raw" / "cohort.json").read_text())
    cases = pd.DataFrame(doc["cases"]).set_index("case_id")
    features = folder / "features"
    X, y = assemble_features(pd.read_parquet(features / f"{source}.parquet"),
                             pd.read_parquet(features / f"{PAIRED[source]}.parquet"), paired_prefix, sites)
    X.index = X.index.astype(str)
    return X, y.to_numpy().astype(int), cases.loc[X.index, "llr"].to_numpy(float), float(doc["bayes_auc"])


def study_auc(X: pd.DataFrame, y: np.ndarray, train: np.ndarray, test: np.ndarray, select: dict, seed: int) -> float:
    """Test AUC of the study's selection + logistic regression fitted on ``train`` rows."""
    model = study_model(select, seed).fit(X.iloc[train], y[train])
    return float(roc_auc_score(y[test], model.predict_proba(X.iloc[test])[:, 1]))


def repeated_splits(y: np.ndarray, repeats: int, seed: int):
    """The ``repeats`` stratified 70/30 (train, test) index pairs of this benchmark family."""
    return StratifiedShuffleSplit(n_splits=repeats, test_size=TEST_FRACTION, random_state=seed).split(np.zeros(len(y)), y)


def over_splits(folder: Path, source: str, params: dict, repeats: int) -> dict:
    X, y, llr, bayes = load_cohort(folder, source, params["select"]["icc"]["paired_prefix"])
    seed = int(params["seed"])
    model, ref = [], []
    for i, (train, test) in enumerate(repeated_splits(y, repeats, seed)):
        model.append(study_auc(X, y, train, test, params["select"], seed))
        ref.append(float(roc_auc_score(y[test], llr[test])))
        log.info("%s split %d/%d: study %.3f, LLR %.3f", folder.name, i + 1, repeats, model[-1], ref[-1])
    m, r = np.asarray(model), np.asarray(ref)
    return {"cohort": str(folder), "source": source, "bayes_auc": round(bayes, 3), "repeats": repeats,
            "study_auc_mean": round(m.mean(), 3), "study_auc_sd": round(m.std(ddof=1), 3),
            "llr_auc_mean": round(r.mean(), 3), "gap_to_bayes_mean": round(bayes - m.mean(), 3),
            "study_minus_llr_mean": round((m - r).mean(), 3),
            "share_within_0.05": round(float(np.mean(m >= bayes - 0.05)), 2)}


def learning_curve(folder: Path, source: str, params: dict, sizes: list[int], repeats: int, test_size: int) -> list[dict]:
    X, y, llr, bayes = load_cohort(folder, source, params["select"]["icc"]["paired_prefix"])
    seed = int(params["seed"])
    pool, test = train_test_split(np.arange(len(y)), test_size=test_size, stratify=y, random_state=seed)
    ref = float(roc_auc_score(y[test], llr[test]))
    rows = []
    for n in sizes:
        if n > len(pool):
            raise SystemExit(f"--train-sizes {n}: only {len(pool)} cases outside the test set")
        aucs = []
        for r in range(1 if n == len(pool) else repeats):
            train = pool if n == len(pool) else train_test_split(pool, train_size=n, stratify=y[pool], random_state=seed + r)[0]
            aucs.append(study_auc(X, y, train, test, params["select"], seed))
            log.info("%s n=%d draw %d: study %.3f (LLR %.3f)", folder.name, n, r + 1, aucs[-1], ref)
        rows.append({"n_train": n, "study_auc_mean": round(float(np.mean(aucs)), 3), "llr_auc": round(ref, 3),
                     "bayes_auc": round(bayes, 3), "draws": len(aucs)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["splits", "curve"])
    parser.add_argument("cohorts", nargs="+", type=Path, help="cohort folders (raw/cohort.json, features/)")
    parser.add_argument("--source", nargs="+", default=["auto"],
                        help="feature source per cohort (one value for all, or one per cohort)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--train-sizes", type=int, nargs="+", default=[62, 124, 250])
    parser.add_argument("--test-size", type=int, default=180)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    params = yaml.safe_load(Path(args.params).read_text())
    sources = args.source * len(args.cohorts) if len(args.source) == 1 else args.source
    if len(sources) != len(args.cohorts):
        raise SystemExit(f"--source: give one value or one per cohort ({len(args.cohorts)})")
    if args.mode == "splits":
        results = [over_splits(c, s, params, args.repeats) for c, s in zip(args.cohorts, sources, strict=True)]
    else:
        results = [{"cohort": str(c), "source": s,
                    "curve": learning_curve(c, s, params, args.train_sizes, args.repeats, args.test_size)}
                   for c, s in zip(args.cohorts, sources, strict=True)]
    print_json(results, args.json)
    return 0


def print_json(results, path: str | None) -> None:
    """The results as JSON on stdout, and into ``path`` when given."""
    text = json.dumps(results, indent=2)
    print(text)
    if path:
        Path(path).write_text(text + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
