"""Benchmark: MISSU vs MONAI UNet vs UNETR (and MISSU without distillation) on the same folds; or,
with ``--cohorts``, one network on cohorts of different scanner protocols, each with its own plan.

Each variant runs the segment stage's cross-validation driver (``run_cross_validation``, params
``segment`` with its profile) on the same preprocessed cases and folds, in its own process so that
its peak resident memory (CPU) or peak CUDA memory is its own. Reported per variant: mean
out-of-fold Dice (original grid), training time, seconds per epoch, inference time per case,
parameters, peak memory.

The cohort is preprocessed and split here, as the preprocess and split stages do, into the work
folder (never the pipeline's outputs): the default cohort (params ``data.cohort_dir``), or with
``--synthetic N`` a synthetic cohort of N cases.

    # the lead's run (alone on the machine): three folds of the cpu profile on the default cohort
    python benchmarks/segmentation.py --n-folds 3 --json benchmarks/results/segmentation.json
    # a few epochs of one fold at full size on a GPU (what benchmarks/gpu_check.sh runs)
    python benchmarks/segmentation.py --profile paper --variants missu --n-folds 1 --max-epochs 3 \\
        --synthetic 60 --spacing 1 --threads 16 --json benchmarks/results/segmentation_gpu.json
    # the quick mode CI runs: 16 small cases, one fold, one epoch, MISSU and UNet
    python benchmarks/segmentation.py --quick --json /tmp/segmentation_quick.json

With ``--cohorts default,site_b`` (issue 14) each named cohort is planned (the plan stage's
fingerprint and plan of every ``auto`` setting), preprocessed, split and segmented with the first
of ``--variants`` over ``--n-folds`` folds: ``default`` is params ``data.cohort_dir`` (or
``--synthetic N`` cases), any other name a synthetic cohort of ``data.synthetic.n_cases`` cases
scanned with that protocol of ``data.synthetic.protocols`` (``site_b``: 2-3 mm slices, twice the
noise, a softer kernel, +30 HU). Reported per cohort: mean out-of-fold Dice, wall time, epochs and
stop reason per fold, and the plan (values, details, warnings).

    # the lead's run (alone on the machine, ~2 x 20 min): ten folds of the cpu profile on both cohorts
    python benchmarks/segmentation.py --cohorts default,site_b --variants missu --n-folds 10 --threads 2 \
        --json benchmarks/results/segmentation_cohorts.json
    # its quick mode (CI): 16 small cases per cohort, one fold, one epoch
    python benchmarks/segmentation.py --quick --cohorts default,site_b --json /tmp/segmentation_cohorts.json
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import multiprocessing as mp
import resource
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

log = logging.getLogger("benchmarks.segmentation")

#: variant -> (network, segment.distill_weight override or None)
VARIANTS = {
    "missu": ("missu", None),
    "missu-no-distill": ("missu", 0.0),
    "unet": ("unet", None),
    "unetr": ("unetr", None),
}
QUICK_CASES, QUICK_POSITIVE = 16, 7
QUICK_VARIANTS = "missu,unet"
QUICK_SEGMENT = {"roi_size": [16, 16, 16], "train.patience": 1, "train.val_mode": "crops", "parallel_folds": 1,
                 "threshold": 0.3, "inference.mirror_axes": [], "inference.overlap": 0.25}


def _run_variant(job: dict[str, Any], queue: Any) -> None:
    """Child process: one cross-validation of one network; puts its result dict on ``queue``."""
    import numpy as np
    import torch

    from bonemet.config import SegmentSpec, validate_spec
    from bonemet.segmentation.cv import run_cross_validation
    from bonemet.segmentation.inference import InferenceSettings
    from bonemet.segmentation.networks import count_parameters, network_from_spec

    torch.set_num_threads(job["threads"])
    spec = validate_spec(SegmentSpec, job["segment"], "segment")
    settings = InferenceSettings.from_metadata(job["settings"], "benchmark")
    start = time.perf_counter()
    result = run_cross_validation(
        job["cases"], job["folds"], spec, settings, seed=job["seed"], mask_label=job["mask_label"],
        grid_tolerance_mm=job["grid_tolerance_mm"], num_threads=job["threads"], figure_dpi=50,
        only_folds=job["only_folds"], groups=job["groups"],
    )
    wall = time.perf_counter() - start
    dices = [r["dice"] for r in result.case_rows]
    n_test = sum(f.n_test for f in result.folds)
    epochs = sum(len(f.history) for f in result.folds)
    out = {
        "dice_mean": float(np.mean(dices)), "dice_sd": float(np.std(dices, ddof=1)) if len(dices) > 1 else 0.0,
        "n_cases": len(dices), "wall_seconds": wall,
        "train_seconds": sum(f.train_seconds for f in result.folds),
        "epochs_per_fold": [len(f.history) for f in result.folds],
        "seconds_per_epoch": sum(f.train_seconds for f in result.folds) / max(1, epochs),
        "infer_seconds_per_case": sum(f.infer_seconds_per_case * f.n_test for f in result.folds) / max(1, n_test),
        "n_parameters": result.folds[0].n_parameters,
        "stop_reasons": [f.stop_reason for f in result.folds],
        "steps_per_fold": [f.steps for f in result.folds],
        "n_parameters_inference": count_parameters(network_from_spec(spec), inference_only=True),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }
    if torch.cuda.is_available():
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    queue.put(out)


def _variant(args: argparse.Namespace, params: Any, prepared: Any, variant: str, work: Path, only: list[int]) -> dict:
    """One cross-validation of ``variant`` in a spawned process (its own peak memory); its result."""
    from bonemet.segmentation.inference import InferenceSettings

    network, distill = VARIANTS[variant]
    changes = {"model": network, "masks_dir": str(work / "masks"), "work_dir": str(work / "work"),
               **(QUICK_SEGMENT if args.quick else {})}
    if distill is not None:
        changes["distill_weight"] = distill
    if args.max_epochs:
        changes["train.max_epochs"] = args.max_epochs
    if args.device:
        changes["device"] = args.device
    seg = params.segment.updated(changes)
    job = {"segment": seg.model_dump(mode="json"),
           "settings": InferenceSettings.from_params(params.preprocess, seg).to_metadata(),
           "cases": prepared.cases, "folds": prepared.folds, "groups": prepared.groups, "only_folds": only,
           "threads": args.threads, "seed": params.seed, "mask_label": params.data.mask_label,
           "grid_tolerance_mm": params.validation.grid_tolerance_mm}
    queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=_run_variant, args=(job, queue))
    log.info("benchmark %s: %d cases, folds %s", variant, len(prepared.cases), only)
    proc.start()
    proc.join()
    result = queue.get() if proc.exitcode == 0 and not queue.empty() else {"error": f"exit code {proc.exitcode}"}
    log.info("%s: %s", variant, result)
    return result


def _by_cohort(args: argparse.Namespace, params: Any) -> int:
    """``--cohorts``: each cohort planned, preprocessed, split and segmented with the first variant."""
    import torch

    variant = args.variants.split(",")[0]
    synthetic = params.data.synthetic
    protocols = {p.name: p for p in synthetic.protocols}
    if args.quick:
        params = params.model_copy(update={"split": params.split.updated({"n_folds": 3})})
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bonemet-segmentation-cohorts-") as tmp:
        work = args.work or Path(tmp)
        for name in args.cohorts.split(","):
            if name != "default" and name not in protocols:
                raise SystemExit(f"--cohorts: '{name}' is neither 'default' nor a protocol of data.synthetic.protocols "
                                 f"({', '.join(protocols)})")
            n_cases = QUICK_CASES if args.quick else (args.synthetic if name == "default" else synthetic.n_cases)
            own = name == "default" and not n_cases
            if own and not (Path(params.data.cohort_dir) / "manifest.csv").is_file():
                raise SystemExit(f"--cohorts default: no cohort at data.cohort_dir ({params.data.cohort_dir}/manifest.csv); "
                                 f"run `bonemet ensure-data` first, or pass --synthetic {synthetic.n_cases} to generate "
                                 "the default synthetic cohort in the work folder")
            start = time.perf_counter()
            prepared = common.prepare_cohort(
                work / name, params, cohort_dir=Path(params.data.cohort_dir) if own else None, n_cases=n_cases,
                n_positive=QUICK_POSITIVE if args.quick else max(2, n_cases * synthetic.n_positive // synthetic.n_cases),
                size="small" if args.quick else synthetic.size, n_jobs=1 if args.quick else params.preprocess.n_jobs,
                protocols=None if name == "default" else [protocols[name]])
            prepare_s = time.perf_counter() - start
            only = sorted(set(prepared.folds.values()))[: args.n_folds]
            result = _variant(args, prepared.params, prepared, variant, work / name / variant, only)
            plan = prepared.plan or {}
            results[name] = {
                **result, "prepare_seconds": prepare_s, "n_cases": len(prepared.cases), "folds": only,
                "plan": {"values": {k: v["value"] for k, v in plan.get("values", {}).items()},
                         "sources": {k: v["source"] for k, v in plan.get("values", {}).items()},
                         "details": plan.get("details"), "warnings": plan.get("warnings"),
                         "fingerprint": {k: v for k, v in plan.get("fingerprint", {}).items() if k != "cases"}},
            }
    report = {"machine": common.machine(), "quick": args.quick, "threads": args.threads, "variant": variant,
              "profile": params.segment.profile, "max_epochs": args.max_epochs or params.segment.train.max_epochs,
              "max_steps": params.segment.train.max_steps,
              "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "cohorts": results}
    common.print_json(report, args.json)
    return 1 if any("error" in r for r in results.values()) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile", default=None, help="segment profile (default params segment.profile)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    parser.add_argument("--n-folds", type=int, default=3, help="folds to run (the first N of the all-cases folds)")
    parser.add_argument("--max-epochs", type=int, default=0, help="override the profile's max_epochs (0 = keep)")
    parser.add_argument("--synthetic", type=int, default=0, help="a synthetic cohort of N cases instead of the default")
    parser.add_argument("--spacing", type=float, default=0.0, help="preprocess target spacing in mm (0 = params)")
    parser.add_argument("--device", default=None, help="segment.device override (auto, cpu, cuda)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="16 small cases, one fold, one epoch (CI runs this)")
    parser.add_argument("--cohorts", default=None,
                        help="comma-separated cohorts (default, or a protocol name of data.synthetic.protocols): "
                             "each planned and segmented with the first variant")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.quick:
        args.variants, args.n_folds, args.max_epochs = QUICK_VARIANTS, 1, 1

    from bonemet.config import load_specs

    params = load_specs(args.params, segment_profile=args.profile)
    if args.cohorts:
        return _by_cohort(args, params)
    pre = {}
    if args.quick:
        pre = {"target_spacing_mm": [2.5, 2.5, 2.5], "crop.min_size_vox": [16, 16, 16]}
    elif args.spacing:
        pre = {"target_spacing_mm": [args.spacing] * 3}
    params = params.model_copy(update={"preprocess": params.preprocess.updated(pre),
                                       **({"split": params.split.updated({"n_folds": 3})} if args.quick else {})})
    synthetic = params.data.synthetic
    n_cases = QUICK_CASES if args.quick else args.synthetic
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bonemet-segmentation-bench-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        prepared = common.prepare_cohort(
            work, params, cohort_dir=None if n_cases else Path(params.data.cohort_dir), n_cases=n_cases,
            n_positive=QUICK_POSITIVE if args.quick else max(2, n_cases * synthetic.n_positive // synthetic.n_cases),
            size="small" if args.quick else synthetic.size, n_jobs=1 if args.quick else params.preprocess.n_jobs)
        params = prepared.params
        only = sorted(set(prepared.folds.values()))[: args.n_folds]
        for variant in args.variants.split(","):
            results[variant] = _variant(args, params, prepared, variant, work / variant, only)
    import torch

    report = {
        "machine": common.machine(), "quick": args.quick, "threads": args.threads,
        "setup": {"profile": params.segment.profile, "n_cases": len(prepared.cases), "folds": only,
                  "roi_size": list(params.segment.updated(QUICK_SEGMENT if args.quick else {}).roi_size),
                  "max_epochs": args.max_epochs or params.segment.train.max_epochs,
                  "spacing_mm": list(params.preprocess.target_spacing_mm),
                  "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "results": results,
    }
    common.print_json(report, args.json)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
