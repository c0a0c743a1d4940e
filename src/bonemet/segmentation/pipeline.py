"""The segmentation phase as one call, in the spirit of :func:`bonemet.modeling.training.run_training`.

:func:`run_segmentation` trains the ten folds (tuning first when ``spec.tune.n_trials``), writes every
case's out-of-fold mask and returns a :class:`SegmentationResult`: the summary (Dice, HD95, volume
difference, the class-dependent error, what each fold trained and why it stopped: never how long
it took), the per-case table, the curves and the best fold's model. :func:`import_segmentation`
does the same for masks made elsewhere (``segment.model: external``). :func:`write_outputs` writes
the summary, the per-case table and the figures. The tracker receives the runs, params and
metrics (wall times among them: MLflow's, not the outputs').
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bonemet.segmentation.metrics import bias_metrics, class_bias, summarize
from bonemet.tracking.base import NullTracker, Tracker

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from bonemet.config import PlannedPreprocessSpec, PlannedSegmentSpec, SegmentSpec
    from bonemet.segmentation.cv import CVResult
    from bonemet.segmentation.data import SegCase
    from bonemet.segmentation.inference import InferenceSettings

log = logging.getLogger(__name__)


@dataclass
class SegmentationResult:
    """What the segmentation phase produced.

    Attributes:
        summary: ``metrics/segmentation.json`` (without the registry gate, which the caller adds).
        case_table: one row per case: its fold and its Dice, HD95 and volume difference.
        spec: the ``segment`` spec as trained (tuned values applied).
        cv: the folds (curves, best fold and its model); None for external masks.
        settings: how the folds' networks segment a CT (the registered model's metadata); None for external masks.
        wall_seconds: the phase's wall time (for MLflow and the log only).
    """

    summary: dict[str, Any]
    case_table: pd.DataFrame
    spec: PlannedSegmentSpec
    cv: CVResult | None = None
    settings: InferenceSettings | None = None
    wall_seconds: float = 0.0


def run_segmentation(
    cases: Sequence[SegCase],
    folds: Mapping[str, int],
    spec: PlannedSegmentSpec,
    preprocess: PlannedPreprocessSpec,
    *,
    seed: int,
    mask_label: int,
    grid_tolerance_mm: float,
    figure_dpi: int,
    plan: Mapping[str, Any] | None = None,
    groups: Mapping[str, str] | None = None,
    only_folds: Sequence[int] | None = None,
    tracker: Tracker | None = None,
) -> SegmentationResult:
    """Ten-fold training of ``spec.model`` and every case's out-of-fold mask (``spec.masks_dir``).

    Args:
        cases: the preprocessed cases (with their labels, original CTs and manual masks).
        folds: case id -> fold (``splits.json`` ``all_folds``).
        spec: the ``segment`` params with the plan applied (no ``auto`` left).
        preprocess: the ``preprocess`` params the cases were made with (the inference settings).
        seed: fold ``k`` is seeded with ``seed + k``.
        mask_label, grid_tolerance_mm: the manual masks' lesion value and grid tolerance (mm).
        figure_dpi: the per-fold curve images' resolution.
        plan: ``data/plan.json``: the sources of the planned settings, and the fingerprint's lesion
            HU and volume for the Dice by lesion density and size.
        groups: case id -> patient id: each fold's validation hold-out keeps patients whole.
        only_folds: run these folds only (debugging, timing).
        tracker: the caller's run receives params, metrics and one nested run per fold.
    """
    import pandas as pd
    import torch

    from bonemet.config import planned_spec
    from bonemet.segmentation.cv import run_cross_validation
    from bonemet.segmentation.inference import InferenceSettings
    from bonemet.segmentation.networks import network_kwargs
    from bonemet.segmentation.training import spec_json

    spec, preprocess = planned_spec(spec, "run_segmentation"), planned_spec(preprocess, "run_segmentation")
    tracker = tracker or NullTracker()
    num_threads = spec.num_threads or os.cpu_count() or 1
    torch.set_num_threads(num_threads)
    net_kwargs = network_kwargs(spec)
    log.info("segment: %s, profile '%s', %d cases, %d folds, roi %s, %d threads, device %s", spec.model, spec.profile,
             len(cases), len(set(folds.values())), spec.roi_size, num_threads, spec.device)
    start = time.perf_counter()
    tracker.log_params({
        "model": spec.model, "profile": spec.profile, "network": net_kwargs, "seed": seed, "num_threads": num_threads,
        **spec_json(spec, exclude={"networks", "profile", "model"}),  # tune.storage without its password
    })
    if plan is not None:  # which settings the plan chose and which params fixed
        tracker.log_params({f"plan_source.{k}": v["source"] for k, v in plan["values"].items()})
        tracker.log_dict(dict(plan), "plan.json")
    if spec.tune.n_trials > 0:
        spec = _tune(spec, cases, folds, seed, tracker)
    settings = InferenceSettings.from_params(preprocess, spec)
    cv = run_cross_validation(
        cases, folds, spec, settings, seed=seed, mask_label=mask_label, grid_tolerance_mm=grid_tolerance_mm,
        num_threads=num_threads, figure_dpi=figure_dpi, tracker=tracker,
        fold_params={"model": spec.model, "network": net_kwargs}, only_folds=only_folds, groups=groups,
    )
    wall = time.perf_counter() - start
    table = pd.DataFrame(cv.case_rows).sort_values("case_id")
    summary = _summary(cv, table, cases, spec, plan=plan, num_threads=num_threads)
    tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, int | float) and v is not None})
    tracker.log_metrics({
        "wall_seconds": wall, "train_seconds_total": sum(f.train_seconds for f in cv.folds),
        "infer_seconds_per_case": sum(f.infer_seconds_per_case * f.n_test for f in cv.folds) / max(1, len(table)),
    })
    tracker.log_metrics({f"folds_stopped_{k}": v for k, v in summary["stop_reasons"].items()})
    tracker.log_metrics(bias_metrics(summary["bias"]))
    return SegmentationResult(summary=summary, case_table=table, spec=spec, cv=cv, settings=settings,
                              wall_seconds=wall)


def _summary(cv: CVResult, table: pd.DataFrame, cases: Sequence[SegCase], spec: PlannedSegmentSpec, *,
             plan: Mapping[str, Any] | None, num_threads: int) -> dict[str, Any]:
    """``segmentation.json``'s summary of the cross-validation ``cv`` (its per-case ``table``): the
    Dice, the bias between the classes, what was trained and how, never how long it took (wall
    times go to MLflow only): the same code, data and params write the same bytes, on any machine
    and under any load."""
    from bonemet.segmentation.training import resolve_device

    summary = summarize(cv.case_rows) if "dice" in table.columns else {"n_cases": len(table)}
    summary["bias"] = class_bias(cv.case_rows, {c.case_id: c.label for c in cases}, plan, spec.bias.max_dice_gap)
    summary.update({
        "model": spec.model, "profile": spec.profile, "n_folds": len(cv.folds), "best_fold": cv.best_fold,
        "device": str(resolve_device(spec.device)), "num_threads": num_threads, "max_steps": spec.train.max_steps,
        "epochs_mean": sum(len(f.history) for f in cv.folds) / max(1, len(cv.folds)),
        "n_parameters": cv.folds[0].n_parameters if cv.folds else 0,
        # per fold: epochs, the epochs the schedule annealed over, steps, why training stopped
        "folds": [f.summary() for f in cv.folds],
        "stop_reasons": dict(sorted(Counter(f.stop_reason for f in cv.folds).items())),
    })
    return summary


def import_segmentation(cases: Sequence[Any], spec: SegmentSpec, *, cohort_dir: str | Path, mask_label: int,
                        grid_tolerance_mm: float, plan: Mapping[str, Any] | None = None,
                        tracker: Tracker | None = None) -> SegmentationResult:
    """``segment.model: external``: the masks of ``spec.external.masks_dir`` (nnU-Net, TotalSegmentator...)
    checked, put on each CT's grid and written as the automatic masks; scored like the network's."""
    import pandas as pd

    from bonemet.segmentation.external import import_external_masks, resolve_external_dir

    tracker = tracker or NullTracker()
    external_dir = resolve_external_dir(spec.external.masks_dir, cohort_dir)
    start = time.perf_counter()
    tracker.log_params({"model": "external", "external_masks_dir": str(external_dir),
                        "external_label": spec.external.label, "mask_label": mask_label, "n_cases": len(cases)})
    rows = import_external_masks(cases, external_dir, spec.masks_dir, label=spec.external.label,
                                 mask_label=mask_label, grid_tolerance_mm=grid_tolerance_mm)
    table = pd.DataFrame(rows).sort_values("case_id")
    summary = summarize(rows)
    summary.update({"model": "external", "external_masks_dir": str(external_dir), "n_folds": 0})
    summary["bias"] = class_bias(rows, {c.case_id: c.label for c in cases}, plan, spec.bias.max_dice_gap)
    tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, int | float) and v is not None})
    tracker.log_metrics(bias_metrics(summary["bias"]))
    wall = time.perf_counter() - start
    tracker.log_metrics({"wall_seconds": wall})
    log.info("external masks from %s", external_dir)
    return SegmentationResult(summary=summary, case_table=table, spec=spec, wall_seconds=wall)


def _tune(spec: PlannedSegmentSpec, cases: Sequence[SegCase], folds: Mapping[str, int], seed: int,
          tracker: Tracker) -> PlannedSegmentSpec:
    """Optuna on the first fold's training cases (its validation split); returns the tuned spec."""
    from bonemet.segmentation.cv import split_validation
    from bonemet.segmentation.data import load_volume
    from bonemet.segmentation.networks import network_from_spec
    from bonemet.segmentation.training import tune

    first = min(folds.values())
    train_all = [c for c in cases if folds[c.case_id] != first]
    train_ids, val_ids = split_validation([c.case_id for c in train_all], spec.val_fraction, seed + first)
    by_id = {c.case_id: c for c in train_all}
    train_items = [load_volume(by_id[i]) for i in train_ids]
    val_items = [load_volume(by_id[i]) for i in val_ids]
    best = tune(lambda: network_from_spec(spec), train_items, val_items, spec, seed=seed, tracker=tracker)
    tracker.log_params({f"tuned.{k}": v for k, v in best.items()})
    return spec.updated({f"train.{k}": v for k, v in best.items()})


def write_outputs(result: SegmentationResult, dpi: int) -> None:
    """The metrics JSON, the per-case CSV, the per-fold curve CSVs (DVC plots), the curves PNG (none
    for external masks) and the Dice histogram, each written atomically."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from bonemet.segmentation.cv import plot_curves
    from bonemet.utils import atomic_path, write_json

    spec, table, cv = result.spec, result.case_table, result.cv
    write_json(spec.metrics, result.summary)
    with atomic_path(spec.cases_table) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(spec.plots_dir, is_dir=True) as tmp_dir:
        (tmp_dir / "curves").mkdir()
        if cv is not None:
            for fold in cv.folds:
                pd.DataFrame(fold.history).to_csv(tmp_dir / "curves" / f"fold-{fold.fold}.csv", index=False)
            fig = plot_curves({f.fold: f.history for f in cv.folds},
                              title=f"{result.summary['model']}: loss and Dice per epoch")
            fig.savefig(tmp_dir / "curves.png", dpi=dpi)
            plt.close(fig)
        if "dice" in table.columns:
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.hist(table["dice"], bins=20, range=(0, 1))
            ax.set_xlabel("Dice (auto vs manual, original grid)" if cv is None
                          else "out-of-fold Dice (auto vs manual, original grid)")
            ax.set_ylabel("cases")
            fig.tight_layout()
            fig.savefig(tmp_dir / "dice_histogram.png", dpi=dpi)
            plt.close(fig)


def input_example(item: Mapping[str, Any], roi_size: Sequence[int]) -> np.ndarray:
    """A network input ``(1, 1, *roi_size)`` float32: the centre of a preprocessed case (zero-padded)."""
    image = np.asarray(item["image"], dtype=np.float32)[0]
    out = np.zeros(tuple(int(r) for r in roi_size), dtype=np.float32)
    src, dst = [], []
    for size, roi in zip(image.shape, out.shape, strict=True):
        start = max(0, (size - roi) // 2)
        length = min(size, roi)
        offset = (roi - length) // 2
        src.append(slice(start, start + length))
        dst.append(slice(offset, offset + length))
    out[tuple(dst)] = image[tuple(src)]
    return out[None, None]
