"""How much of the synthetic cohort's label signal reaches the radiomic features.

The synthetic label acts on the images only through three phenotype latents (density,
heterogeneity, irregularity; ``cohort.json``). For each feature table (one per mask source) this
prints, on the pipeline's own train/test split:

  1. per latent: the radiomic feature with the highest |Spearman rho| on all cases, and that
     feature's ICC between the source and its paired source (the study's ICC filter keeps
     features with ICC >= select.icc.threshold, so a latent whose features fail it is lost);
  2. an "oracle": a logistic regression on those three features (quantile-normalised, fitted on
     the training cases) and its test AUC, next to the test AUC of the latents' own LLR: the
     most a classifier can get from the features with the selection solved;
  3. the study's selection (ICC, correlation filter, scaler, LASSO; params ``select``) with a fixed
     logistic regression (C = 0.1): mean AUC over the ten training folds and the test AUC.

Run after ``dvc repro extract`` (needs ``data/features``, ``data/splits.json`` and the cohort):

    python benchmarks/latent_recovery.py [--sources auto manual] [--params params.yaml]
    # the quick mode CI runs: harmonization.py's quick cohort (24 small cases, cheap features,
    # manual and annotator masks), split here (seconds)
    python benchmarks/latent_recovery.py --quick /tmp/latent_quick --json /tmp/latent_quick.json
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import QuantileTransformer, StandardScaler

from bonemet.config import SelectSpec, validate_spec
from bonemet.data.synthetic_latents import LATENT_NAMES
from bonemet.modeling.pipeline import build_selection
from bonemet.modeling.training import assemble_features
from bonemet.selection.icc import icc

log = logging.getLogger("benchmarks.latent_recovery")

PAIRED = {"auto": "manual", "manual": "auto", "annotator": "manual"}
FIXED_C = 0.1


def study_model(select: SelectSpec | Mapping, seed: int) -> Pipeline:
    """The study's selection (params ``select``: the spec, or the raw mapping) with a fixed logistic
    regression (C = FIXED_C)."""
    if not isinstance(select, SelectSpec):
        select = validate_spec(SelectSpec, select, "select")
    clf = LogisticRegression(C=FIXED_C, max_iter=5000)
    return Pipeline([*build_selection(select, seed), ("clf", clf)]).set_output(transform="pandas")


def _auc(labels, scores) -> float:
    return float(roc_auc_score(labels, scores))


def recovery(source: str, params: dict, features_dir: Path, cohort: pd.DataFrame, splits: dict) -> dict:
    """The three checks above for one mask source."""
    pair = PAIRED[source]
    if source == "manual" and not (features_dir / "auto.parquet").exists():
        pair = "annotator"
    table = pd.read_parquet(features_dir / f"{source}.parquet").set_index("case_id")
    other = pd.read_parquet(features_dir / f"{pair}.parquet").set_index("case_id").loc[table.index]
    table.index = table.index.astype(str)
    other.index = table.index
    latents = cohort.loc[table.index]
    features = [f for f in table.columns if f != "label" and table[f].std() > 0]
    train, test = [str(i) for i in splits["train"]], [str(i) for i in splits["test"]]
    out: dict = {"source": source, "paired_with": pair, "latents": {}}
    iccs = pd.Series(icc(table[features].to_numpy(float), other[features].to_numpy(float), params["select"]["icc"]["form"]), index=features)
    best = []
    for name in LATENT_NAMES:
        rho = table[features].corrwith(latents[name], method="spearman").abs()
        feature = str(rho.idxmax())
        best.append(feature)
        out["latents"][name] = {"feature": feature, "abs_spearman": round(float(rho.max()), 3), "icc": round(float(iccs[feature]), 3)}
    y = table["label"].astype(int)
    oracle = make_pipeline(
        QuantileTransformer(n_quantiles=min(100, len(train)), output_distribution="normal"),
        StandardScaler(),
        LogisticRegression(C=1.0, max_iter=2000),
    ).fit(table.loc[train, best], y.loc[train])
    out["oracle_test_auc"] = round(_auc(y.loc[test], oracle.predict_proba(table.loc[test, best])[:, 1]), 3)
    out["latent_llr_test_auc"] = round(_auc(latents.loc[test, "label"], latents.loc[test, "llr"]), 3)
    out["icc_pass"] = int((iccs >= params["select"]["icc"]["threshold"]).sum())

    X, y = assemble_features(pd.read_parquet(features_dir / f"{source}.parquet"), pd.read_parquet(features_dir / f"{pair}.parquet"),
                             params["select"]["icc"]["paired_prefix"])
    X.index = X.index.astype(str)
    y.index = X.index
    seed = int(params["seed"])

    def pipeline() -> Pipeline:
        return study_model(params["select"], seed)

    folds = {str(k): v for k, v in splits["train_folds"].items()}
    cv = []
    for k in sorted(set(folds.values())):
        fit_rows = [i for i in train if folds[i] != k]
        held = [i for i in train if folds[i] == k]
        cv.append(_auc(y.loc[held], pipeline().fit(X.loc[fit_rows], y.loc[fit_rows]).predict_proba(X.loc[held])[:, 1]))
    final = pipeline().fit(X.loc[train], y.loc[train])
    out["selection_logreg"] = {
        "cv_auc_mean": round(float(np.mean(cv)), 3),
        "test_auc": round(_auc(y.loc[test], final.predict_proba(X.loc[test])[:, 1]), 3),
        "n_selected": int(final.named_steps["lasso"].get_support().sum()),
    }
    return out


def _quick_cohort(folder: Path, params_path: str, params: dict) -> tuple[Path, Path, dict]:
    """harmonization.py's quick cohort in ``folder`` and a 3-fold split of it (the quick mode)."""
    import importlib.util
    import sys

    from bonemet.config import load_specs
    from bonemet.data.manifest import read_manifest
    from bonemet.splits import make_splits

    if "harmonization" not in sys.modules:
        spec = importlib.util.spec_from_file_location("harmonization", Path(__file__).with_name("harmonization.py"))
        sys.modules["harmonization"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["harmonization"])
    sys.modules["harmonization"].prepare(folder, load_specs(params_path), quick=True)
    params["select"]["lasso"].update(cv=3, max_features=5)  # LASSO's lambda search on ~16 training cases
    cases = read_manifest(folder / "raw")
    splits = make_splits([c.case_id for c in cases], [c.label for c in cases], test_size=params["split"]["test_size"],
                         n_folds=3, seed=int(params["seed"]))
    return folder / "raw", folder / "features", splits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--sources", nargs="+", default=["auto", "manual"])
    parser.add_argument("--quick", type=Path, default=None, metavar="DIR",
                        help="a small cohort with features in DIR (made when missing), split here (CI runs this)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    params = yaml.safe_load(Path(args.params).read_text())
    if args.quick is not None:
        cohort_dir, features_dir, splits = _quick_cohort(args.quick, args.params, params)
        args.sources = ["annotator"]
    else:
        cohort_dir, features_dir = Path(params["data"]["cohort_dir"]), Path(params["radiomics"]["out_dir"])
        splits = json.loads(Path(params["split"]["out"]).read_text())
    cohort_doc = json.loads((cohort_dir / "cohort.json").read_text())
    cohort = pd.DataFrame(cohort_doc["cases"]).set_index("case_id")
    results = [recovery(s, params, features_dir, cohort, splits) for s in args.sources]
    log.info("Bayes-optimal AUC of the cohort: %.3f", cohort_doc["bayes_auc"])
    for r in results:
        log.info("[%s, ICC paired with %s] %d features pass the ICC filter", r["source"], r["paired_with"], r["icc_pass"])
        for name, v in r["latents"].items():
            log.info("  %-13s best feature %-50s |rho| %.3f  ICC %.3f", name, v["feature"], v["abs_spearman"], v["icc"])
        log.info("  oracle (3 features) test AUC %.3f; latents' LLR test AUC %.3f", r["oracle_test_auc"], r["latent_llr_test_auc"])
        s = r["selection_logreg"]
        log.info("  study selection + logreg C=%s: CV AUC %.3f, test AUC %.3f (%d features)", FIXED_C, s["cv_auc_mean"], s["test_auc"], s["n_selected"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
