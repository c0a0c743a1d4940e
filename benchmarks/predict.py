"""`bonemet predict` end to end: seconds per CT with a given mask and with MISSU, start-up included.

Each measurement is the real command in a fresh process (``python -m bonemet predict ...``), as a
user runs it, against a local MLflow store made here with both models registered (alias
``staging``). Per run: the wall time, the CPU time of the process (user + system: on a shared
machine the better guide to an idle one's wall time for this mostly single-threaded command),
and the command's own ``seconds`` per step (read, load_models, segment with its preprocess /
windows / map_back, features, classify). ``startup_s`` = wall - the steps: interpreter, imports
of the command line and the params, and exit.

CTs: a synthetic case (size ``full``: about 80 x 80 x 60 mm at 0.6-1.0 x 1-3 mm) and a
clinical-size CT made from it (:func:`bonemet.data.synthetic_clinical.clinical_ct`: 512 x 512 x
200 at 0.8 x 0.8 x 1.5 mm, a body with the spine repeated along z, ribs and pelvis).

Models: the classifier is the project's pipeline (``build_pipeline('svm', ...)`` with params
``select``) fitted on jittered copies of the cohort's feature rows (its cost, not its answer,
is measured) and logged as the register stage logs it (with its training domain). The segmentation model is the profile's
MISSU (``cpu``): untrained by default, with its lesion output turned off (a forward pass costs
the same whatever the weights, but an untrained mask is noise: the command then answers
``no_lesion`` and the features' cost is the given-mask run's), or the network trained by
``benchmarks/inference.py --save-model`` (``--missu-model``), whose masks are real.

    # the lead's full run (alone on the machine, about 3 min):
    python benchmarks/inference.py --work bench/inference --save-model bench/inference/fold0_model.pt
    python benchmarks/predict.py --missu-model bench/inference/fold0_model.pt --repeats 3 \\
        --json benchmarks/results/predict.json
    # the quick mode CI runs: small CTs, cheap features, one run each (seconds)
    python benchmarks/predict.py --quick --json /tmp/predict_quick.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
_spec = importlib.util.spec_from_file_location("benchmarks_common", _HERE / "_common.py")
common = sys.modules["benchmarks_common"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

log = logging.getLogger("benchmarks.predict")

CLINICAL = {"size": (512, 512, 200), "spacing_mm": (0.8, 0.8, 1.5)}
QUICK_CLINICAL = {"size": (64, 64, 24), "spacing_mm": (2.0, 2.0, 3.0)}
QUICK_RUNS = ("native CT, given mask", "clinical CT, MISSU")
#: quick mode: PyRadiomics on two cheap feature classes of the original image, 16^3 windows
QUICK_RADIOMICS = {"imageType": {"Original": {}}, "featureClass": {"firstorder": None, "shape": None},
                   "setting": {"geometryTolerance": 1e-4}}
QUICK_PARAMS = {"preprocess": {"target_spacing_mm": [2.5, 2.5, 2.5], "crop": {"min_size_vox": [16, 16, 16]}},
                "segment": {"profiles": {"cpu": {"roi_size": [16, 16, 16], "inference": {"mirror_axes": [], "overlap": 0.25}}}},
                "radiomics": {"resampled_spacing_mm": []}}


def _write_params(work: Path, params_path: str, quick: bool) -> Path:
    """params.yaml with the benchmark's store (and in quick mode its cheap settings)."""
    import yaml

    from bonemet.config import deep_merge, load_params

    raw = load_params(params_path)
    raw["tracking"]["store_dir"] = str(work / "mlruns")
    settings_file = Path(raw["radiomics"]["settings_file"]).resolve()
    if quick:
        raw = deep_merge(raw, QUICK_PARAMS)
        settings_file = work / "radiomics.yaml"
        settings_file.write_text(yaml.safe_dump(QUICK_RADIOMICS))
    raw["radiomics"]["settings_file"] = str(settings_file)
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _register_models(work: Path, params: Any, feature_rows: list[dict[str, float]], missu_model: Path | None,
                     seed: int) -> dict[str, Any]:
    """Both models in ``work/mlruns``, alias staging, logged as the register and segment stages log them."""
    import numpy as np
    import pandas as pd
    import torch

    from bonemet.modeling.domain import fit_training_domain
    from bonemet.modeling.pipeline import build_pipeline
    from bonemet.registry.pyfunc import log_classifier
    from bonemet.registry.store import MlflowTracker, register_model, set_alias
    from bonemet.segmentation.inference import InferenceSettings
    from bonemet.segmentation.networks import network_from_spec, network_kwargs

    rng = np.random.default_rng(seed)
    names = list(feature_rows[0])
    base = np.asarray([[row[n] for n in names] for row in feature_rows], float)
    rows = base[np.arange(40) % len(base)] * (1 + 0.1 * rng.standard_normal((40, len(names))))
    table = pd.DataFrame(rows, columns=names)
    paired = table * (1 + 0.01 * rng.standard_normal(table.shape))
    X = pd.concat([table, paired.add_prefix(params.select.icc.paired_prefix)], axis=1)
    labels = np.arange(40) % 2
    svm = {**params.train.fixed_params.get("svm", {}), "C": 1.0, "gamma": 0.01}
    pipeline = build_pipeline("svm", svm, params.select, seed).fit(X, labels)

    seg = params.segment
    network = network_from_spec(seg)
    source = "untrained, lesion output off"
    if missu_model is None:
        _no_lesion_head(network)
    else:
        saved = torch.load(missu_model, map_location="cpu", weights_only=True)
        network.load_state_dict(saved["state_dict"])
        source = str(missu_model)
    settings = InferenceSettings.from_params(params.preprocess, seg)
    metadata = {"network": seg.model, "network_kwargs": {k: list(v) if isinstance(v, tuple) else v
                                                         for k, v in network_kwargs(seg).items()},
                **settings.to_metadata(), "source_fold": 0, "source_run_id": ""}
    tracker = MlflowTracker("predict-benchmark", tracking_uri=None, store_dir=work / "mlruns", system_metrics=False,
                            system_metrics_interval_s=None)
    domain = fit_training_domain(pipeline, table, np.arange(len(table)) % 5, params.train.domain, seed=seed)
    store = tracker.client
    with tracker.run("register"):
        info = log_classifier(tracker, pipeline, names, threshold=0.5, model_name="svm", domain=domain,
                              check_rows=table)
    set_alias(store, "bonemet-classifier", "staging", register_model(store, info, "bonemet-classifier"))
    with tracker.run("segment"):
        info = tracker.log_model(network.eval(), name="model", flavor="pytorch", pip_requirements=["torch"],
                                 metadata=metadata, serialization_format="pickle")
    set_alias(store, "bonemet-segmenter", "staging", register_model(store, info, "bonemet-segmenter"))
    return {"classifier": "svm pipeline (params select)", "n_features": len(names), "missu_weights": source,
            "missu_profile": seg.profile, "inference": settings.inference.model_dump(mode="json")}


def _no_lesion_head(network: Any) -> None:
    """An untrained network's mask is noise, often hundreds of mL (features then take minutes): turn
    its lesion output off (the last 2-class convolution's lesion bias at -1000), so the command finds
    no lesion and stops after segmentation. Same cost per window; the features' cost on a real lesion
    is the given-mask run's."""
    import torch

    from bonemet.segmentation.networks import N_CLASSES

    heads = [m for m in network.modules() if isinstance(m, torch.nn.Conv3d) and m.out_channels == N_CLASSES]
    with torch.no_grad():
        heads[-1].bias[1:] = -1000.0


def _command(params_path: Path, image: Path, mask: Path | None, extra: list[str], cwd: Path) -> dict[str, Any]:
    """One `bonemet predict` in a fresh process: its JSON, wall and CPU seconds."""
    argv = [sys.executable, "-m", "bonemet", "--log-level", "WARNING", "predict", "--params", str(params_path),
            str(image), *(["--mask", str(mask)] if mask is not None else []), *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=600)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"bonemet predict failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    steps = {k: v for k, v in result["seconds"].items() if not k.startswith("segment_")}
    return {"wall_s": wall, "cpu_s": cpu, "startup_s": wall - sum(steps.values()), **{f"{k}_s": v for k, v in
            result["seconds"].items()}, "status": result["status"], "lesion_ml": result["lesion_volume_ml"],
            "peak_rss_mib": after.ru_maxrss / 1024.0}


def _median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k in runs[0] if isinstance(runs[0][k], float | int) and not isinstance(runs[0][k], bool)]
    row = {k: round(statistics.median(r[k] for r in runs if k in r), 3) for k in keys}
    row["status"] = runs[0]["status"]
    row["runs"] = len(runs)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each command (the median is reported)")
    parser.add_argument("--missu-model", type=Path, default=None,
                        help="a trained network from benchmarks/inference.py --save-model (default untrained)")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=20240638)
    parser.add_argument("--runs", nargs="+", default=None, metavar="RUN",
                        help="only these runs (by their names in the results, e.g. 'native CT, given mask')")
    parser.add_argument("--quick", action="store_true", help="small CTs, cheap features, one run (CI runs this)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("radiomics", "mlflow", "alembic", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from bonemet.config import load_specs
    from bonemet.data.io import read_image, read_mask, write_image
    from bonemet.data.manifest import read_manifest
    from bonemet.data.synthetic import generate_cohort
    from bonemet.data.synthetic_clinical import clinical_ct
    from bonemet.radiomics import extract_features, settings_from_params

    repeats = 1 if args.quick else args.repeats
    with tempfile.TemporaryDirectory(prefix="bonemet-predict-bench-") as tmp:
        work = (args.work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        params_path = _write_params(work, args.params, args.quick)
        params = common.with_reference_plan(load_specs(params_path))
        label = params.data.mask_label
        generate_cohort(work / "cohort", n_cases=2, n_positive=1, seed=args.seed, size="small" if args.quick else "full",
                        mask_label=label, overwrite=True, show_progress=False)
        cases = read_manifest(work / "cohort")
        settings = settings_from_params(params)
        rows = [extract_features(c.image, c.manual_mask, settings, c.case_id,
                                 grid_tolerance_mm=params.validation.grid_tolerance_mm) for c in cases]
        models = _register_models(work, params, rows, args.missu_model, args.seed)
        size = QUICK_CLINICAL if args.quick else CLINICAL
        big, big_mask = clinical_ct(read_image(cases[0].image), read_mask(cases[0].manual_mask, label=label),
                                    size=size["size"], spacing_mm=size["spacing_mm"], seed=args.seed)
        write_image(big, work / "clinical.nii.gz")
        write_image(big_mask, work / "clinical_mask.nii.gz")
        runs = {
            "native CT, given mask": (cases[0].image, cases[0].manual_mask, []),
            "clinical CT, given mask": (work / "clinical.nii.gz", work / "clinical_mask.nii.gz", []),
            "clinical CT, MISSU": (work / "clinical.nii.gz", None, []),
            "clinical CT, MISSU --disable-tta": (work / "clinical.nii.gz", None, ["--disable-tta"]),
            "native CT, MISSU": (cases[0].image, None, []),
        }
        results = []
        for name, (image, mask, extra) in runs.items():
            if (args.quick and name not in QUICK_RUNS) or (args.runs and name not in args.runs):
                continue
            measured = [_command(params_path, image, mask, extra, work) for _ in range(repeats)]
            row = {"run": name, "size": list(read_image(image).GetSize()), **_median_row(measured)}
            results.append(row)
            log.info("%s", row)
    out = {"machine": common.machine(), "quick": args.quick, "models": models,
           "clinical_ct": {"size": list(size["size"]), "spacing_mm": list(size["spacing_mm"])}, "rows": results}
    common.print_json(out, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
