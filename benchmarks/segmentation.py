"""Benchmark: MISSU vs MONAI UNet vs UNETR (and MISSU without distillation) on the same folds.

Each variant runs the same cross-validation driver (``bonemet.segmentation.cv``) on the same
cases and folds, in its own process so that its peak resident memory (CPU) or peak CUDA
memory is its own. Reported per variant: mean out-of-fold Dice (original grid), training time,
inference time per case, trainable parameters, peak memory.

Usage (from the repository root, after the preprocess stage):

    python benchmarks/segmentation.py --n-folds 3 --max-cases 30 --out benchmarks/results/segmentation.json

Settings come from params.yaml (``segment`` with its profile), overridable below; the
benchmark never writes the pipeline's outputs (it works in a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("benchmarks.segmentation")

VARIANTS = {
    "missu": ("missu", None),
    "missu-no-distill": ("missu", 0.0),
    "unet": ("unet", None),
    "unetr": ("unetr", None),
}


def _run_variant(spec: dict[str, Any], queue: Any) -> None:
    """Child process: one cross-validation of one network; puts its result dict on ``queue``."""
    import numpy as np
    import torch

    from bonemet.segmentation.cv import run_cross_validation
    from bonemet.segmentation.data import SegCase
    from bonemet.segmentation.networks import build_network, count_parameters
    from bonemet.segmentation.training import TrainConfig

    torch.set_num_threads(spec["threads"])
    config = TrainConfig(**spec["config"])
    cases = [SegCase(**c) for c in spec["cases"]]

    def factory():
        return build_network(spec["network"], roi_size=config.roi_size, **spec["network_kwargs"])

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = run_cross_validation(
            cases, spec["folds"], factory, config, Path(tmp) / "masks", Path(tmp) / "work", None,
            val_fraction=spec["val_fraction"], threshold=spec["threshold"],
            largest_component=spec["largest_component"],
        )
        wall = time.perf_counter() - start
    dices = [r["dice"] for r in result.case_rows]
    n_test = sum(f.n_test for f in result.folds)
    out = {
        "dice_mean": float(np.mean(dices)), "dice_sd": float(np.std(dices, ddof=1)) if len(dices) > 1 else 0.0,
        "n_cases": len(dices), "wall_seconds": wall,
        "train_seconds": sum(f.train_seconds for f in result.folds),
        "epochs_per_fold": [len(f.history) for f in result.folds],
        "seconds_per_epoch": sum(f.train_seconds for f in result.folds) / max(1, sum(len(f.history) for f in result.folds)),
        "infer_seconds_per_case": sum(f.infer_seconds_per_case * f.n_test for f in result.folds) / max(1, n_test),
        "n_parameters": result.folds[0].n_parameters,
        "n_parameters_inference": count_parameters(factory(), inference_only=True),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }
    if torch.cuda.is_available():
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    queue.put(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile", default=None)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    parser.add_argument("--n-folds", type=int, default=3, help="folds to run (the first N of splits all_folds)")
    parser.add_argument("--max-cases", type=int, default=0, help="limit the cohort (0 = all cases of those folds)")
    parser.add_argument("--max-epochs", type=int, default=0, help="override the profile's max_epochs (0 = keep)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/segmentation.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    from bonemet.config import get, load_params
    from bonemet.data.manifest import read_manifest
    from bonemet.segmentation.data import load_cases
    from bonemet.stages.segment import resolve_params, train_config

    params = load_params(args.params)
    seg = resolve_params(params, args.profile)
    config = train_config(seg, int(get(params, "seed")))
    manifest = read_manifest(get(params, "data.cohort_dir"))
    originals = {c.case_id: (c.image, c.manual_mask) for c in manifest}
    cases = load_cases(seg["preprocessed_dir"], originals)
    all_folds = json.loads(Path(seg["splits"]).read_text())["all_folds"]
    keep = sorted({int(v) for v in all_folds.values()})[: args.n_folds]
    cases = [c for c in cases if int(all_folds[c.case_id]) in keep]
    if args.max_cases:
        cases = cases[: args.max_cases]
    folds = {c.case_id: int(all_folds[c.case_id]) for c in cases}
    cfg = config.as_dict()
    cfg["num_threads"] = args.threads
    if args.max_epochs:
        cfg["max_epochs"] = args.max_epochs

    results: dict[str, Any] = {}
    ctx = mp.get_context("spawn")
    for variant in args.variants.split(","):
        network, distill = VARIANTS[variant]
        spec = {
            "network": network, "network_kwargs": dict(seg["networks"].get(network, {})),
            "config": {**cfg, **({"distill_weight": distill} if distill is not None else {})},
            "cases": [{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(c).items()} for c in cases],
            "folds": folds, "threads": args.threads, "val_fraction": float(seg["val_fraction"]),
            "threshold": float(seg["threshold"]), "largest_component": bool(seg["largest_component"]),
        }
        queue = ctx.Queue()
        proc = ctx.Process(target=_run_variant, args=(spec, queue))
        log.info("benchmark %s: %d cases, folds %s", variant, len(cases), keep)
        proc.start()
        proc.join()
        if proc.exitcode != 0 or queue.empty():
            results[variant] = {"error": f"exit code {proc.exitcode}"}
        else:
            results[variant] = queue.get()
        log.info("%s: %s", variant, results[variant])

    report = {
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                    "cpu_count": mp.cpu_count(), "threads": args.threads,
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "setup": {"profile": seg["profile"], "n_cases": len(cases), "folds": keep, "roi_size": list(config.roi_size),
                  "max_epochs": cfg["max_epochs"], "networks": {v: seg["networks"].get(VARIANTS[v][0], {})
                                                                 for v in args.variants.split(",")}},
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
