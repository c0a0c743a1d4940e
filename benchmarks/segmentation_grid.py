"""Benchmark (issue 23 §2): segmentation Dice over a grid of scanner protocols, each cell its own
cohort from the second generator (:mod:`bonemet.data.synthetic_longbone`), planned by itself and
segmented with the ten-fold cpu profile.

Cells: slice thickness (``THICKNESS_MM``) x noise sd (``NOISE_HU``); each cell also gets one of
``KERNEL_SD_MM`` and of ``HU_OFFSET`` in a Latin square (every kernel and every offset once per row
and per column), so four axes are varied in nine cohorts. Each cell's cohort (``--n-cases``, half
label 1, seed ``--seed`` + the cell's index: no two cells share lesions) is planned (every ``auto``
setting of params, as the plan stage does), preprocessed, split (params ``split``) and segmented
with params ``segment`` (``--profile``, default params' own) by ``benchmarks/segmentation.py``'s
runner (``run_cross_validation`` in a spawned process). The out-of-fold masks are then scored
against the manual ones here (Dice per case) and grouped by :func:`bonemet.segmentation.metrics.
dice_by_group` into quartiles of lesion density (the lesion's mean contrast over the marrow in HU,
from the cohort's cohort.json: quartile 1 is the most lytic) and of lesion volume (mL).

Reported per cell: the protocol, whether it is clinical (slices <= 3 mm and noise <= 45 HU), mean
and sd of the Dice, n, wall seconds, Dice per density and size quartile, per density class and per
label, the plan's values; and the targets checked: Dice >= 0.80 in every clinical cell, >= 0.75
in the most lytic quartile of every clinical cell. Plus ``machine`` and ``commit``.

    # the full run (alone on the machine; ~9 cells x ~15-18 min with 60 cases, ten folds, 2 threads: ~2.5 h)
    python benchmarks/segmentation_grid.py --n-cases 60 --n-folds 10 --threads 2 \\
        --json benchmarks/results/segmentation_grid.json
    # some cells only (to split the run): --cells 1.25x15,3x45
    # the quick mode CI runs: 2 cells, 12 tiny cases each, one fold, one epoch (~1 min)
    python benchmarks/segmentation_grid.py --quick --json /tmp/segmentation_grid.json

The grid's values and the lesion model are the module constants below; nothing here is tuned to a
cohort. The held-back cohort of issue 23 §2 comes from yet another generator and is run as a user's
data (``benchmarks/segmentation.py --cohorts default`` on its folder), not here.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
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
# loaded at import so that a spawned child (which re-runs this file) finds its runner by name
segmentation = common.load_sibling("segmentation")

log = logging.getLogger("benchmarks.segmentation_grid")

THICKNESS_MM = (1.25, 3.0, 5.0)
NOISE_HU = (15.0, 45.0, 60.0)
KERNEL_SD_MM = (0.5, 0.9, 1.3)  # in-plane point-spread sd: sharp, standard, soft
HU_OFFSET = (-20.0, 0.0, 30.0)
PIXEL_SPACING_MM = 0.9
#: the clinical range: slices at most this thick (mm) and noise at most this sd (HU)
CLINICAL_MAX_THICKNESS_MM, CLINICAL_MAX_NOISE_HU = 3.0, 45.0
TARGET_DICE_CLINICAL, TARGET_DICE_MOST_LYTIC = 0.80, 0.75
#: lesions from 0.2 to 10 mL; contrast over the marrow from 40 HU (strongly lytic) to 1000 HU (blastic)
LESION_VOLUME_ML, LESION_CONTRAST_HU, DENSITY_MEAN_BY_LABEL = (0.2, 10.0), (40.0, 1000.0), (0.35, 0.65)
SEED = 2302
QUICK_CELLS = ((1.25, 15.0), (5.0, 60.0))
QUICK_CASES, QUICK_PIXEL_SPACING_MM = 12, 2.0
QUICK_PREPROCESS = {"target_spacing_mm": [2.5, 2.5, 2.5], "crop.min_size_vox": [16, 16, 16]}


def grid_cells(quick: bool, only: str | None) -> list[dict[str, float]]:
    """The cells: thickness x noise, kernel and offset in a Latin square; ``only`` ("3x45,...") filters."""
    cells = []
    for i, thickness in enumerate(THICKNESS_MM):
        for j, noise in enumerate(NOISE_HU):
            if quick and (thickness, noise) not in QUICK_CELLS:
                continue
            cells.append({"name": f"{thickness:g}x{noise:g}", "index": 3 * i + j, "slice_thickness_mm": thickness,
                          "noise_sd_hu": noise, "kernel_sd_mm": KERNEL_SD_MM[(i + j) % 3],
                          "hu_offset": HU_OFFSET[(i + 2 * j) % 3]})
    if only:
        wanted = set(only.split(","))
        unknown = wanted - {c["name"] for c in cells}
        if unknown:
            raise SystemExit(f"--cells: unknown cell(s) {sorted(unknown)}; cells are {[c['name'] for c in cells]}")
        cells = [c for c in cells if c["name"] in wanted]
    return cells


def is_clinical(cell: dict[str, float]) -> bool:
    return cell["slice_thickness_mm"] <= CLINICAL_MAX_THICKNESS_MM and cell["noise_sd_hu"] <= CLINICAL_MAX_NOISE_HU


def _cohort(cell: dict[str, float], folder: Path, args: argparse.Namespace, mask_label: int) -> dict[str, Any]:
    """The cell's cohort written into ``folder`` (kept when already there); its cohort.json."""
    import json

    from bonemet.data.synthetic_longbone import LesionModel, ScanProtocol, generate_longbone_cohort

    if (folder / "cohort.json").is_file():
        return json.loads((folder / "cohort.json").read_text(encoding="utf-8"))
    protocol = ScanProtocol(slice_thickness_mm=cell["slice_thickness_mm"], noise_sd_hu=cell["noise_sd_hu"],
                            kernel_sd_mm=cell["kernel_sd_mm"], hu_offset=cell["hu_offset"],
                            pixel_spacing_mm=QUICK_PIXEL_SPACING_MM if args.quick else PIXEL_SPACING_MM)
    lesions = LesionModel(volume_ml=LESION_VOLUME_ML, contrast_hu=LESION_CONTRAST_HU,
                          density_mean=DENSITY_MEAN_BY_LABEL)
    return generate_longbone_cohort(folder, n_cases=args.n_cases, n_positive=args.n_cases // 2,
                                    seed=args.seed + int(cell["index"]), protocol=protocol, lesions=lesions,
                                    mask_label=mask_label, overwrite=True)


def score_cell(cohort: dict[str, Any], cohort_dir: Path, masks_dir: Path, *, mask_label: int,
               grid_tolerance_mm: float) -> dict[str, Any]:
    """Dice of every out-of-fold mask in ``masks_dir`` against its manual mask, grouped by label,
    density and size quartile, and density class."""
    import numpy as np

    from bonemet.data.io import read_mask
    from bonemet.segmentation.metrics import case_metrics, dice_by_group

    cases = {c["case_id"]: c for c in cohort["cases"]}
    rows = []
    for path in sorted(masks_dir.glob("*.nii.gz")):
        cid = path.name.removesuffix(".nii.gz")
        ref = read_mask(cohort_dir / "masks" / f"{cid}.nii.gz", label=mask_label, case_id=cid)
        rows.append(case_metrics(read_mask(path, label=mask_label, case_id=cid), ref, cid,
                                 grid_tolerance_mm=grid_tolerance_mm))
    groups = dice_by_group(rows, {k: c["label"] for k, c in cases.items()},
                           {k: c["lesion_contrast_hu"] for k, c in cases.items()},
                           {k: c["lesion_volume_ml"] for k, c in cases.items()})
    by_class: dict[str, Any] = {}
    for kind in ("lytic", "mixed", "blastic"):
        dices = [r["dice"] for r in rows if cases[r["case_id"]]["density_class"] == kind]
        by_class[kind] = {"n": len(dices), "dice_mean": float(np.mean(dices)) if dices else None}
    dices = [r["dice"] for r in rows]
    return {"dice_mean_scored": float(np.mean(dices)) if dices else None, "n_scored": len(dices),
            "by_density_class": by_class, **groups}


def run_cell(cell: dict[str, float], args: argparse.Namespace, params: Any, work: Path) -> dict[str, Any]:
    """One cell: its cohort generated, planned, preprocessed, split, segmented and scored."""
    start = time.perf_counter()
    cohort = _cohort(cell, work / "raw", args, params.data.mask_label)
    prepared = common.prepare_cohort(work, params, cohort_dir=work / "raw", n_cases=args.n_cases,
                                     n_positive=args.n_cases // 2, size="full", n_jobs=1 if args.quick else 2)
    only = ([int(f) for f in args.folds.split(",")] if args.folds
            else sorted(set(prepared.folds.values()))[: args.n_folds])
    variant = args.variants.split(",")[0]
    result = segmentation._variant(args, prepared.params, prepared, variant, work / variant, only)
    scored = {}
    if "error" not in result:
        scored = score_cell(cohort, work / "raw", work / variant / "masks", mask_label=params.data.mask_label,
                            grid_tolerance_mm=params.validation.grid_tolerance_mm)
    plan = prepared.plan or {}
    return {**cell, "clinical": is_clinical(cell), **result, **scored, "folds": only,
            "wall_seconds": time.perf_counter() - start, "cv_wall_seconds": result.get("wall_seconds"),
            "plan": {k: v["value"] for k, v in plan.get("values", {}).items()}}


def check_targets(cells: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets over the clinical cells: every mean Dice >= 0.80, every most lytic
    quartile's >= 0.75 (None when no clinical cell was run)."""
    clinical = {k: c for k, c in cells.items() if c["clinical"] and c.get("dice_mean") is not None}
    lytic = {k: c["by_density_quartile"][0]["dice_mean"] for k, c in clinical.items() if c.get("by_density_quartile")}
    dice_min = min((c["dice_mean"] for c in clinical.values()), default=None)
    lytic_min = min(lytic.values(), default=None)
    return {
        "clinical_cells": sorted(clinical), "clinical_dice_min": dice_min, "target_dice_clinical": TARGET_DICE_CLINICAL,
        "clinical_dice_met": None if dice_min is None else dice_min >= TARGET_DICE_CLINICAL,
        "most_lytic_quartile_dice": lytic, "most_lytic_quartile_dice_min": lytic_min,
        "target_dice_most_lytic": TARGET_DICE_MOST_LYTIC,
        "most_lytic_met": None if lytic_min is None else lytic_min >= TARGET_DICE_MOST_LYTIC,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile", default=None, help="segment profile (default params segment.profile)")
    parser.add_argument("--variants", default="missu", help="the network (first of these; benchmarks/segmentation.py's)")
    parser.add_argument("--n-cases", type=int, default=60, help="cases per cell's cohort (half label 1)")
    parser.add_argument("--n-folds", type=int, default=10, help="folds to run (the first N of params split.n_folds)")
    parser.add_argument("--folds", default=None, help="comma-separated folds to run instead of the first --n-folds "
                        "(to split a cell's ten folds over two runs)")
    parser.add_argument("--max-epochs", type=int, default=0, help="override the profile's max_epochs (0 = keep)")
    parser.add_argument("--cells", default=None, help="comma-separated cells to run, e.g. 1.25x15,3x45 (default all)")
    parser.add_argument("--seed", type=int, default=SEED, help="cell k's cohort uses seed + k")
    parser.add_argument("--device", default=None, help="segment.device override (auto, cpu, cuda)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="2 cells, 12 tiny cases, one fold, one epoch (CI)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.quick:
        args.n_cases, args.n_folds, args.max_epochs, args.threads = QUICK_CASES, 1, 1, 1

    from bonemet.config import load_specs

    params = load_specs(args.params, segment_profile=args.profile)
    if args.quick:
        params = params.model_copy(update={"preprocess": params.preprocess.updated(QUICK_PREPROCESS),
                                           "split": params.split.updated({"n_folds": 3})})
    cells: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bonemet-segmentation-grid-") as tmp:
        work = args.work or Path(tmp)
        for cell in grid_cells(args.quick, args.cells):
            cells[cell["name"]] = run_cell(cell, args, params, work / cell["name"])
            log.info("cell %s: Dice %s", cell["name"], cells[cell["name"]].get("dice_mean"))
    report = {"machine": common.machine(), "commit": common.commit(), "quick": args.quick, "threads": args.threads,
              "profile": params.segment.profile, "n_cases": args.n_cases, "n_folds": args.n_folds,
              "max_epochs": args.max_epochs or params.segment.train.max_epochs, "seed": args.seed,
              "lesion_model": {"volume_ml": LESION_VOLUME_ML, "contrast_hu": LESION_CONTRAST_HU,
                               "density_mean_by_label": DENSITY_MEAN_BY_LABEL},
              "clinical_range": {"max_slice_thickness_mm": CLINICAL_MAX_THICKNESS_MM,
                                 "max_noise_sd_hu": CLINICAL_MAX_NOISE_HU},
              "targets": check_targets(cells), "cells": cells}
    common.print_json(report, args.json)
    return 1 if any("error" in c for c in cells.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
