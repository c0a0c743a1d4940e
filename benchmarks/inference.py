"""What each sliding-window inference setting costs in Dice, and what it saves in time.

Trains one fold of the segmentation (params ``segment`` with its profile, ``cpu`` by default) on
the default cohort exactly as ``bonemet segment --folds F`` does (``run_cross_validation`` with
``only_folds``), then segments that fold's held-out cases again with each inference setting
below and reports, per setting:

* the mean out-of-fold Dice (original grid, against the manual masks) and its paired difference
  to the params' setting (same cases, same network);
* seconds per case (the synthetic cohort's CTs, about 80 x 80 x 60 mm);
* seconds for one clinical-size CT (:func:`bonemet.data.synthetic_clinical.clinical_ct`: a
  held-out case in a 512 x 512 x 200 body at 0.8 x 0.8 x 1.5 mm, ribs and pelvis), split into
  preprocessing, windows and mapping back, and the windows run.

Settings (changes to ``segment.inference``): ``params`` (as params.yaml has them), ``dense``
(``bone_margin_mm: null``: every window of the bone crop), ``no-tta`` (``mirror_axes: []``, what
``bonemet predict --disable-tta`` does), ``mirror-w`` (one axis: 2 passes), ``overlap-0.25``,
``window-48`` and ``window-64`` (inference windows larger than the 32^3 training crop),
``window-64-fast`` (64^3, overlap 0.25, no mirroring) and ``contiguous`` (no channels-last).

    # the lead's full run (alone on the machine; about 4 min of training + 2-3 min of inference):
    python benchmarks/inference.py --work bench/inference --json benchmarks/results/inference.json \\
        --save-model bench/inference/fold0_model.pt
    # the quick mode CI runs: 16 small cases, 2 epochs, 16^3 windows, a small 'clinical' CT
    python benchmarks/inference.py --quick --work /tmp/inference_quick --json /tmp/inference_quick.json

``--save-model`` keeps the trained fold's network (state dict and its segment settings) so that
``benchmarks/predict.py --missu-model`` times a real prediction with it.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import statistics
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

log = logging.getLogger("benchmarks.inference")

#: name -> changes to segment.inference (``params``: none)
SETTINGS: dict[str, dict[str, Any]] = {
    "params": {},
    "dense": {"bone_margin_mm": None},
    "no-tta": {"mirror_axes": []},
    "mirror-w": {"mirror_axes": [2]},
    "overlap-0.25": {"overlap": 0.25},
    "window-48": {"roi_size": [48, 48, 48]},
    "window-64": {"roi_size": [64, 64, 64]},
    "window-64-fast": {"roi_size": [64, 64, 64], "overlap": 0.25, "mirror_axes": []},
    "contiguous": {"channels_last": False},
}
QUICK_SETTINGS = {"params": {}, "no-tta": {"mirror_axes": []}, "window-32": {"roi_size": [32, 32, 32]}}
CLINICAL = {"size": (512, 512, 200), "spacing_mm": (0.8, 0.8, 1.5)}
QUICK_CLINICAL = {"size": (64, 64, 24), "spacing_mm": (2.0, 2.0, 3.0)}
#: quick mode: a tiny cohort and network schedule (what the smoke run uses)
QUICK_CASES, QUICK_POSITIVE = 16, 7
QUICK_PREPROCESS = {"target_spacing_mm": [2.5, 2.5, 2.5], "crop.min_size_vox": [16, 16, 16]}
QUICK_SEGMENT = {"roi_size": [16, 16, 16], "train.max_epochs": 1, "train.patience": 1, "train.val_mode": "crops",
                 "parallel_folds": 1, "threshold": 0.3, "inference.mirror_axes": [2], "inference.overlap": 0.25}
QUICK_HELD_OUT = 2


def _dice_per_case(model, cases, settings, grid_tolerance_mm: float, mask_label: int, device) -> tuple[dict, float]:
    from bonemet.segmentation.cv import manual_mask
    from bonemet.segmentation.inference import predict_case
    from bonemet.segmentation.metrics import case_metrics

    dice, seconds = {}, []
    for case in cases:
        start = time.perf_counter()
        mask = predict_case(model, case, settings, device=device)
        seconds.append(time.perf_counter() - start)
        ref = manual_mask(case, mask, mask_label, grid_tolerance_mm)
        dice[case.case_id] = case_metrics(mask, ref, case.case_id, grid_tolerance_mm=grid_tolerance_mm)["dice"]
    return dice, statistics.median(seconds)


def _clinical_seconds(model, image, settings, device) -> dict[str, Any]:
    import SimpleITK as sitk

    from bonemet.preprocessing import preprocess_image
    from bonemet.segmentation.inference import segment_ct, window_starts, windows_near

    steps: dict[str, float] = {}
    start = time.perf_counter()
    segment_ct(model, image, settings, device=device, case_id="clinical", seconds=steps)
    total = time.perf_counter() - start
    crop = sitk.GetArrayFromImage(preprocess_image(image, settings.preprocess).image)
    starts = window_starts([max(n, w) for n, w in zip(crop.shape, settings.window, strict=True)], settings.window,
                           settings.inference.overlap)
    keep = settings.bone_in_crop(crop)
    run = len(starts) if keep is None else int(windows_near(keep, starts, settings.window, settings.margin_vox()).sum())
    passes = run * 2 ** len(settings.inference.mirror_axes)
    return {"seconds": round(total, 2), **{f"{k}_s": round(v, 2) for k, v in steps.items()},
            "crop_vox": list(crop.shape), "windows": run, "windows_total": len(starts), "forward_windows": passes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile", default=None, help="segment profile (default params segment.profile)")
    parser.add_argument("--cohort", type=Path, default=None,
                        help="cohort folder (default params data.cohort_dir; --quick writes a small one)")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--settings", nargs="+", default=None, help=f"of {list(SETTINGS)} (default all)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--save-model", type=Path, default=None, help="write the fold's trained network here")
    parser.add_argument("--quick", action="store_true", help="seconds: a tiny cohort, 2 epochs (CI runs this)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("radiomics", "bonemet.segmentation.training"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import SimpleITK as sitk
    import torch

    from bonemet.config import load_specs
    from bonemet.data.io import read_image, read_mask
    from bonemet.data.synthetic_clinical import clinical_ct
    from bonemet.segmentation.cv import run_cross_validation
    from bonemet.segmentation.inference import InferenceSettings

    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    params = load_specs(args.params, segment_profile=args.profile)
    if args.quick:
        params = params.model_copy(update={"preprocess": params.preprocess.updated(QUICK_PREPROCESS),
                                           "split": params.split.updated({"n_folds": 3})})
    chosen = args.settings or list(QUICK_SETTINGS if args.quick else SETTINGS)
    table = {**SETTINGS, **QUICK_SETTINGS}
    with tempfile.TemporaryDirectory(prefix="bonemet-inference-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        cohort_dir = args.cohort if args.cohort or args.quick else Path(params.data.cohort_dir)
        prepared = common.prepare_cohort(work, params, cohort_dir=None if args.quick else cohort_dir,
                                         n_cases=QUICK_CASES, n_positive=QUICK_POSITIVE, size="small",
                                         n_jobs=1 if args.quick else params.preprocess.n_jobs)
        params = prepared.params
        seg = params.segment.updated({"masks_dir": str(work / "masks"), "work_dir": str(work / "segmentation"),
                                      **(QUICK_SEGMENT if args.quick else {})})
        base = InferenceSettings.from_params(params.preprocess, seg)
        log.info("training fold %d of %d cases (%s profile)", args.fold, len(prepared.cases), seg.profile)
        start = time.perf_counter()
        result = run_cross_validation(
            prepared.cases, prepared.folds, seg, base, seed=params.seed, mask_label=params.data.mask_label,
            grid_tolerance_mm=params.validation.grid_tolerance_mm, num_threads=args.threads,
            figure_dpi=params.evaluate.figure_dpi, only_folds=[args.fold], groups=prepared.groups,
        )
        train_s = time.perf_counter() - start
        model = result.best_model.to(args.device).eval()
        if args.save_model:
            args.save_model.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"state_dict": model.state_dict(), "segment": seg.model_dump(mode="json"),
                        "preprocess": params.preprocess.model_dump(mode="json")}, args.save_model)
        held_out = [c for c in prepared.cases if prepared.folds[c.case_id] == args.fold]
        held_out = held_out[:QUICK_HELD_OUT] if args.quick else held_out
        first = next(c for c in prepared.manifest if c.case_id == held_out[0].case_id)
        size = QUICK_CLINICAL if args.quick else CLINICAL
        clinical, _ = clinical_ct(read_image(first.image), read_mask(first.manual_mask, label=params.data.mask_label),
                                  size=size["size"], spacing_mm=size["spacing_mm"], seed=params.seed)
        rows, reference = [], None
        for name in chosen:
            settings = InferenceSettings(base.preprocess, base.roi_size, base.inference.updated(table[name]),
                                         base.threshold, base.largest_component)
            dice, per_case = _dice_per_case(model, held_out, settings, params.validation.grid_tolerance_mm,
                                            params.data.mask_label, args.device)
            reference = reference if reference is not None else dice
            diffs = [dice[c] - reference[c] for c in dice]
            row = {"setting": name, "changes": table[name], "n_cases": len(dice),
                   "dice_mean": round(statistics.mean(dice.values()), 4),
                   "dice_sd": round(statistics.stdev(dice.values()), 4) if len(dice) > 1 else None,
                   f"dice_minus_{chosen[0]}": round(statistics.mean(diffs), 4),
                   "seconds_per_case": round(per_case, 3),
                   "clinical_ct": _clinical_seconds(model, clinical, settings, args.device)}
            rows.append(row)
            log.info("%s", row)
    out = {"machine": common.machine(), "profile": seg.profile, "fold": args.fold, "quick": args.quick,
           "n_cases": len(prepared.cases), "train_seconds": round(train_s, 1),
           "fold_oof_dice_params": rows[0]["dice_mean"] if rows else None,
           "clinical_ct": {"size": list(size["size"]), "spacing_mm": list(size["spacing_mm"])},
           "inference": base.inference.model_dump(mode="json"), "rows": rows}
    common.print_json(out, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
