"""`bonemet predict` benchmark: time per CT on CPU with a given mask and with MISSU segmentation.

Measures :func:`bonemet.serving.predict.predict_case` in one process with the models already
loaded (what a long-running service or a batch loop pays per CT), step by step:
read (CT + mask), segment (preprocess + MISSU sliding window + mapping back), features
(PyRadiomics with the training settings: params.yaml ``radiomics`` + config/radiomics.yaml,
1316 features by default) and classify. Separately: the one-off start-up cost of the command
(imports, and loading both models from a local MLflow store).

Data: a synthetic cohort (bonemet.data.synthetic, size "full": 0.6-1.0 mm in-plane, 1-3 mm
slices) and the same CTs padded with air to a clinical 512 x 512 matrix (the crop to the bone
keeps segmentation cost bounded; reading and the bone box scale with the matrix).

Models: MISSU built as in training (bonemet.segmentation.networks.build_network, roi from
params ``segment`` when present, else 64^3) with untrained weights: the cost of a forward pass
does not depend on the weights. An untrained network's mask is meaningless, so after timing the
real segmentation the benchmark hands the manual mask to feature extraction: both runs extract
the same lesion and their difference is the segmentation cost. The classifier is an RBF SVM
(the study's pick) fitted on jittered copies of one feature row: its cost, not its answer, is
measured.

Usage: python benchmarks/predict.py [--n-cases 3] [--repeats 2] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# benchmarks/ holds radiomics.py: drop this folder from the import path so that `radiomics`
# means PyRadiomics.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

log = logging.getLogger("benchmarks.predict")


def _settings(params):
    from bonemet.stages.predict import radiomics_settings

    return radiomics_settings(params)


def _classifier(features, seed):
    import numpy as np
    import pandas as pd
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    from bonemet.serving.checks import check_feature_frame

    rng = np.random.default_rng(seed)
    names = list(features)
    base = np.asarray([features[n] for n in names], float)
    rows = base * (1 + 0.1 * rng.standard_normal((40, len(names))))
    labels = np.arange(40) % 2
    pipe = make_pipeline(StandardScaler(), SVC(probability=True, random_state=seed)).fit(
        pd.DataFrame(rows, columns=names), labels
    )

    class Classifier:
        name, version, feature_names, pipeline = "svm-benchmark", "0", names, pipe

        def predict(self, frame):
            x = check_feature_frame(frame, names)
            proba = pipe.predict_proba(x)[:, 1]
            return pd.DataFrame({"probability_breast": proba, "label": (proba >= 0.5).astype(int)})

    return Classifier()


class TimedMissuThenManual:
    """Runs the real MISSU segmentation (timed by predict_case), then returns the manual mask."""

    def __init__(self, missu, manual_masks):
        self.missu, self.manual_masks = missu, manual_masks
        self.name, self.version = "missu-untrained", "0"

    def segment(self, image_hu, case_id):
        import SimpleITK as sitk

        auto = self.missu.segment(image_hu, case_id)
        assert auto.GetSize() == image_hu.GetSize()
        mask = sitk.ReadImage(str(self.manual_masks[case_id]))
        return sitk.Cast(mask > 0, sitk.sitkUInt8)


def _pad_to_matrix(case, out_dir, matrix):
    """The CT and mask padded with air (-1000 HU) / 0 to ``matrix`` x ``matrix`` in-plane."""
    import SimpleITK as sitk

    from bonemet.data.io import read_image, write_image

    image = read_image(case.image)
    mask = read_image(case.manual_mask)
    nx, ny, _ = image.GetSize()
    lo = [max(0, (matrix - nx) // 2), max(0, (matrix - ny) // 2), 0]
    hi = [max(0, matrix - nx - lo[0]), max(0, matrix - ny - lo[1]), 0]
    big = sitk.ConstantPad(image, lo, hi, -1000.0)
    big_mask = sitk.ConstantPad(mask, lo, hi, 0)
    paths = (out_dir / f"{case.case_id}_{matrix}.nii.gz", out_dir / f"{case.case_id}_{matrix}_mask.nii.gz")
    write_image(big, paths[0])
    write_image(big_mask, paths[1])
    return paths, big.GetSize()


def _startup_seconds(repo: Path) -> dict[str, float]:
    """Wall time of a fresh process importing what `bonemet predict` imports."""
    code = (
        "import time; t=time.perf_counter(); import torch, monai, mlflow, radiomics, sklearn; "
        "import bonemet.serving.predict, bonemet.registry.loaders; print(time.perf_counter()-t)"
    )
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo, check=True)
    return {"process_total_s": time.perf_counter() - start, "imports_s": float(out.stdout.strip().splitlines()[-1])}


def _registry_load_seconds(missu, classifier_pipe_features, tmp: Path) -> dict[str, float]:
    """Time to load both models by alias from a local MLflow store (logged here first)."""
    import pandas as pd

    from bonemet.registry.loaders import load_classifier, load_segmenter
    from bonemet.registry.pyfunc import log_classifier
    from bonemet.registry.store import MlflowTracker, register_model, set_alias

    pipe, names, row = classifier_pipe_features
    tracker = MlflowTracker("predict-benchmark", store_dir=tmp / "mlruns")
    with tracker.run("classifier") as run_id:
        log_classifier(pipe, names, threshold=0.5, model_name="svm", input_example=pd.DataFrame([row]),
                       pip_requirements=["scikit-learn"])
    set_alias("bonemet-classifier", "staging", register_model(run_id, "classifier", "bonemet-classifier"))
    with tracker.run("segment") as run_id:
        tracker.log_model(missu.model, name="model", flavor="pytorch", pip_requirements=["torch"],
                          serialization_format="pickle", metadata={"roi_size": list(missu.roi_size)})
    set_alias("bonemet-missu", "staging", register_model(run_id, "model", "bonemet-missu"))
    start = time.perf_counter()
    load_classifier("bonemet-classifier", "staging")
    mid = time.perf_counter()
    load_segmenter("bonemet-missu", "staging")
    end = time.perf_counter()
    return {"load_classifier_s": mid - start, "load_segmenter_s": end - mid}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cases", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per CT and mode (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="torch and SimpleITK threads")
    parser.add_argument("--matrix", type=int, default=512, help="in-plane matrix of the padded 'clinical' CTs")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile", default=None, help="segment profile (default: params segment.profile)")
    parser.add_argument("--seed", type=int, default=20240638)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("radiomics", "mlflow", "alembic", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import SimpleITK as sitk
    import torch

    from bonemet.config import load_params
    from bonemet.data.manifest import read_manifest
    from bonemet.data.synthetic import generate_cohort
    from bonemet.radiomics import extract_features
    from bonemet.segmentation.networks import build_network
    from bonemet.serving.predict import MissuSegmenter, predict_case
    from bonemet.stages.predict import segmentation_fallback
    from bonemet.stages.segment import resolve_params

    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    params = load_params(args.params)
    settings = _settings(params)
    fallback = segmentation_fallback(params, args.profile)
    seg = resolve_params(params, args.profile)
    roi = tuple(fallback["roi_size"])
    net_kwargs = dict((seg.get("networks") or {}).get(seg["model"], {}) or {})
    network = build_network(seg["model"], in_channels=1, out_channels=2, roi_size=roi, **net_kwargs).eval()
    missu = MissuSegmenter(
        model=network, preprocess=fallback["preprocess"], roi_size=roi,
        overlap=float(fallback["overlap"] if fallback["overlap"] is not None else 0.25),
        sw_batch_size=int(fallback["sw_batch_size"] or 4),
        threshold=float(fallback["threshold"] if fallback["threshold"] is not None else 0.5),
        largest_component=True,
    )
    results: dict = {"threads": args.threads, "profile": seg["profile"], "network": seg["model"],
                     "network_kwargs": net_kwargs, "roi_size": list(roi), "overlap": missu.overlap,
                     "sw_batch_size": missu.sw_batch_size, "n_parameters": sum(p.numel() for p in network.parameters()),
                     "n_cases": args.n_cases,
                     "repeats": args.repeats, "settings": {k: sorted(v or {}) for k, v in settings.items()
                                                           if k != "setting"}}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        n_generate = max(2, args.n_cases)  # the generator needs two cases at least
        generate_cohort(tmp / "cohort", n_cases=n_generate, n_positive=n_generate // 2,
                        seed=args.seed, size="full", show_progress=False)
        cases = read_manifest(tmp / "cohort")[: args.n_cases]
        first = extract_features(cases[0].image, cases[0].manual_mask, settings, cases[0].case_id)
        classifier = _classifier(first, args.seed)
        results["n_features"] = len(first)
        inputs = []
        for case in cases:
            size = sitk.ReadImage(str(case.image)).GetSize()
            inputs.append(("native", case.case_id, case.image, case.manual_mask, size))
            (big, big_mask), big_size = _pad_to_matrix(case, tmp, args.matrix)
            inputs.append((f"{args.matrix}-matrix", case.case_id, big, big_mask, big_size))
        rows = []
        for kind, case_id, image, mask, size in inputs:
            segmenter = TimedMissuThenManual(missu, {Path(image).name.split(".")[0]: mask})
            for mode in ("given mask", "missu"):
                times = []
                for repeat in range(args.repeats + 1):
                    start = time.perf_counter()
                    out = predict_case(image, mask if mode == "given mask" else None, segmenter=segmenter,
                                       classifier=classifier, radiomics_settings=settings, mask_label=1,
                                       threshold=0.5)
                    total = time.perf_counter() - start
                    if repeat:  # the first run warms caches (PyRadiomics, torch kernels)
                        times.append({"total": total, **out["seconds"]})
                row = {"ct": kind, "case_id": case_id, "size": list(size), "mode": mode,
                       "lesion_ml": round(out["lesion_volume_ml"], 2)}
                for key in times[0]:
                    row[f"{key}_s"] = round(statistics.median(t[key] for t in times), 2)
                rows.append(row)
                log.info("%s", row)
        results["rows"] = rows
        results.update(_startup_seconds(Path.cwd()))
        pipe_features = (classifier.pipeline, classifier.feature_names, first)
        results.update(_registry_load_seconds(missu, pipe_features, tmp))
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
