"""Does ComBat harmonisation (params ``select.harmonize``) help on a two-site cohort?

A two-site synthetic cohort (``bonemet synth --sites 2``: the second site scanned with
``data.synthetic.protocols[1]``: 2-3 mm slices, twice the noise, a softer kernel, +30 HU) has a
site that is independent of the label but shifts and scales many radiomic features. Over
``--repeats`` stratified 70/30 splits (cohort_variation.py's splits) this fits the study's
selection (ICC, correlation filter, scaler, LASSO: params ``select``) with cohort_variation's
fixed logistic regression, once without and once with ComBat as the first step (fitted on the
training rows of each split only), and records per split:

  * the test AUC of both pipelines and their paired difference (harmonised - raw);
  * the test AUC of the latents' LLR (the Bayes classifier) on the same test cases;
  * how well the site can be told from the features (site AUC of a logistic regression on all
    z-scored features, trained on the training rows): ComBat should bring it towards 0.5.

Prints mean +- sd of each and the share of splits where harmonisation wins; ``--json`` writes
them. The cohort folder holds ``raw/`` (the cohort, with its ``site`` column) and ``features/``
(``<source>.parquet`` and its pair, as the extract stage writes them); a missing folder is made
first (synthetic cohort from params ``data.synthetic`` with 2 sites, then PyRadiomics with the
project's settings on the manual and annotator masks: about 25 s + 2 x 1 min on 2 cores).

    # the full run (the lead's: minutes of full CPU), 178 cases, 20 splits:
    python benchmarks/harmonization.py bench/two_site --repeats 20 --json benchmarks/results/harmonization.json
    # the quick mode a test runs: 24 small cases, cheap features, 2 splits (seconds)
    python benchmarks/harmonization.py --quick /tmp/harmonization_quick
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bonemet.config import load_specs
from bonemet.data.manifest import SITE_COLUMN, read_manifest

_HERE = Path(__file__).resolve().parent
# benchmarks/radiomics.py would shadow PyRadiomics: this folder leaves sys.path, siblings load by file
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]


_spec = importlib.util.spec_from_file_location("benchmarks_common", _HERE / "_common.py")
common = sys.modules["benchmarks_common"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

study_model = common.load_sibling("latent_recovery").study_model  # cohort_variation imports it by name
load_cohort, repeated_splits = common.load_sibling("cohort_variation").load_cohort, common.load_sibling("cohort_variation").repeated_splits

log = logging.getLogger("benchmarks.harmonization")

# Quick mode: a cohort of small volumes and two cheap feature classes on the original image.
QUICK_CASES, QUICK_POSITIVE, QUICK_REPEATS = 24, 10, 2
QUICK_SETTINGS = {
    "imageType": {"Original": {}},
    "featureClass": {"shape": [], "firstorder": [], "glcm": []},
    "setting": {"binWidth": 25, "resampledPixelSpacing": None, "label": 1},
}


def prepare(folder: Path, params, *, quick: bool) -> None:
    """Write a two-site synthetic cohort into ``folder/raw`` and its manual and annotator features
    into ``folder/features`` (skipped when they exist)."""
    from bonemet.data.synthetic import generate_cohort
    from bonemet.radiomics import extract_sources, settings_from_params

    raw, features = folder / "raw", folder / "features"
    synth = params.data.synthetic
    if not (raw / "manifest.csv").is_file():
        n, n_pos = (QUICK_CASES, QUICK_POSITIVE) if quick else (synth.n_cases, synth.n_positive)
        log.info("writing a two-site cohort of %d cases to %s", n, raw)
        generate_cohort(raw, n_cases=n, n_positive=n_pos, seed=synth.seed, size="small" if quick else synth.size,
                        mask_label=params.data.mask_label, protocols=synth.protocols[:2], overwrite=True,
                        show_progress=False)
    if not (features / "annotator.parquet").is_file():
        settings = dict(QUICK_SETTINGS) if quick else settings_from_params(params)
        settings["setting"] = {**settings["setting"], "label": params.data.mask_label}
        log.info("extracting the manual and annotator features into %s", features)
        extract_sources(read_manifest(raw), settings, features, sources=["manual", "annotator"], auto_masks_dir=None,
                        n_jobs=1 if quick else params.radiomics.n_jobs, compute=params.compute,
                        cache_dir=None if quick else params.radiomics.cache_dir, allow_drop=False,
                        grid_tolerance_mm=params.validation.grid_tolerance_mm, show_progress=False)


def _site_auc(X, sites: np.ndarray, train, test, seed: int) -> float:
    """How well a linear model tells the second site from the first on the test rows (0.5: not at all)."""
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000, random_state=seed))
    target = (sites == sorted(set(sites))[-1]).astype(int)
    model.fit(X.iloc[train], target[train])
    return float(roc_auc_score(target[test], model.predict_proba(X.iloc[test])[:, 1]))


def run(folder: Path, params, *, source: str, repeats: int) -> dict:
    """Test AUC with and without ComBat over ``repeats`` stratified splits of the cohort in ``folder``."""
    sites = {c.case_id: c.site for c in read_manifest(folder / "raw")}
    if len(set(sites.values()) - {None}) < 2:
        raise SystemExit(f"{folder}/raw: the manifest names fewer than two sites (write it with --sites 2)")
    X, y, llr, bayes = load_cohort(folder, source, params.select.icc.paired_prefix, sites)
    site_of = X[SITE_COLUMN].to_numpy()
    raw_select = params.select.updated({"harmonize.enabled": False})
    combat_select = params.select.updated({"harmonize.enabled": True})
    raw_X = X.drop(columns=[SITE_COLUMN])
    primary = [c for c in raw_X.columns if not c.startswith(params.select.icc.paired_prefix)]
    seed = params.seed
    rows = []
    for i, (train, test) in enumerate(repeated_splits(y, repeats, seed)):
        raw_model = study_model(raw_select, seed).fit(raw_X.iloc[train], y[train])
        combat_model = study_model(combat_select, seed).fit(X.iloc[train], y[train])
        harmonised = combat_model.named_steps["harmonize"].transform(X[primary + [SITE_COLUMN]])
        row = {
            "raw_auc": float(roc_auc_score(y[test], raw_model.predict_proba(raw_X.iloc[test])[:, 1])),
            "combat_auc": float(roc_auc_score(y[test], combat_model.predict_proba(X.iloc[test])[:, 1])),
            "llr_auc": float(roc_auc_score(y[test], llr[test])),
            "site_auc_raw": _site_auc(raw_X[primary], site_of, train, test, seed),
            "site_auc_combat": _site_auc(harmonised, site_of, train, test, seed),
        }
        rows.append(row)
        log.info("split %d/%d: test AUC raw %.3f, ComBat %.3f (LLR %.3f); site AUC %.2f -> %.2f", i + 1, repeats,
                 row["raw_auc"], row["combat_auc"], row["llr_auc"], row["site_auc_raw"], row["site_auc_combat"])
    table = {k: np.asarray([r[k] for r in rows]) for k in rows[0]}
    diff = table["combat_auc"] - table["raw_auc"]

    def sd(values: np.ndarray) -> float | None:
        return round(float(values.std(ddof=1)), 3) if len(values) > 1 else None

    return {
        "cohort": str(folder), "source": source, "n_cases": int(len(y)), "repeats": repeats,
        "sites": dict(sorted({s: int((site_of == s).sum()) for s in set(site_of)}.items())),
        "bayes_auc": round(bayes, 3),
        **{f"{k}_mean": round(float(v.mean()), 3) for k, v in table.items()},
        "raw_auc_sd": sd(table["raw_auc"]), "combat_auc_sd": sd(table["combat_auc"]),
        "combat_minus_raw_mean": round(float(diff.mean()), 3), "combat_minus_raw_sd": sd(diff),
        "share_combat_better": round(float(np.mean(diff > 0)), 2),
        "splits": [{k: round(v, 4) for k, v in r.items()} for r in rows],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cohort", type=Path, help="folder with raw/ and features/ (made when missing)")
    parser.add_argument("--source", default="annotator", choices=["annotator", "manual"],
                        help="features the classifier sees (ICC-paired with the other; default: annotator, the "
                        "stand-in for automatic masks that needs no segmentation run)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_CASES} small cases, cheap features, {QUICK_REPEATS} splits (a test runs this)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    params = load_specs(args.params)
    if args.quick:  # LASSO's lambda search on ~16 training cases
        params = params.model_copy(update={"select": params.select.updated({"lasso.cv": 3, "lasso.max_features": 5})})
    prepare(args.cohort, params, quick=args.quick)
    result = run(args.cohort, params, source=args.source, repeats=QUICK_REPEATS if args.quick else args.repeats)
    log.info("test AUC over %d splits: raw %.3f +- %s, ComBat %.3f +- %s, difference %+.3f (ComBat better on %.0f %%); "
             "site AUC %.2f -> %.2f; Bayes %.3f", result["repeats"], result["raw_auc_mean"], result["raw_auc_sd"],
             result["combat_auc_mean"], result["combat_auc_sd"], result["combat_minus_raw_mean"],
             100 * result["share_combat_better"], result["site_auc_raw_mean"], result["site_auc_combat_mean"],
             result["bayes_auc"])
    common.print_json(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
