"""Ten-fold cross-validation driver: every case gets exactly one out-of-fold automatic mask.

For fold k the network trains on the cases of every other fold. Early stopping needs a
validation set that fold k never sees, so a seeded ``val_fraction`` of those training cases
(at least one) is held out of the gradient steps and used for early stopping and for choosing
the best checkpoint; fold k itself is touched only for its out-of-fold prediction. The
held-out fold is then segmented with sliding-window inference, postprocessed (largest
component), mapped to each case's original grid and written as ``<case_id>.nii.gz``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk

from bonemet.data.dicom_masks import read_lesion_mask
from bonemet.data.io import write_image
from bonemet.errors import UserError
from bonemet.segmentation.data import SegCase, load_volume
from bonemet.segmentation.inference import CaseInferenceError, InferenceSettings, predict_case
from bonemet.segmentation.metrics import case_metrics
from bonemet.segmentation.networks import count_parameters, network_from_spec, seed_everything
from bonemet.segmentation.training import train_model
from bonemet.tracking.base import NullTracker, Tracker
from bonemet.utils import atomic_path, die_with_parent, log_context, progress

if TYPE_CHECKING:  # pragma: no cover
    from bonemet.config import PlannedSegmentSpec

log = logging.getLogger(__name__)


class FoldAssignmentError(UserError, ValueError):
    """Cases and folds do not match (a case without a fold, or a fold with unknown cases)."""


@dataclass
class FoldResult:
    """What one fold produced."""

    fold: int
    history: list[dict[str, float]]
    best_epoch: int
    best_val_dice: float
    n_train: int
    n_val: int
    n_test: int
    train_seconds: float
    infer_seconds_per_case: float
    n_parameters: int
    run_id: str | None = None
    #: why training ended (bonemet.segmentation.training.STOP_REASONS)
    stop_reason: str = "max_epochs"
    #: the epochs the learning rate annealed over (max_epochs, or the epochs that hold the step budget)
    planned_epochs: int = 0
    #: optimiser steps taken
    steps: int = 0
    #: the epoch a rerun resumed after (0: trained from the start; MLflow only: history, not result)
    resumed_from: int = 0

    def summary(self) -> dict[str, Any]:
        """The fold's line in metrics/segmentation.json: what it trained, no wall times (those go to
        MLflow), so the same code, data and params write the same bytes."""
        return {"fold": self.fold, "epochs": len(self.history), "planned_epochs": self.planned_epochs,
                "steps": self.steps, "best_epoch": self.best_epoch,
                "best_val_dice": round(float(self.best_val_dice), 6), "stop_reason": self.stop_reason}


@dataclass
class CVResult:
    """Per-case metrics (with their fold), per-fold results and the best fold's model."""

    case_rows: list[dict[str, Any]]
    folds: list[FoldResult]
    best_fold: int
    best_model: Any = None
    best_run_id: str | None = None
    extra: dict = field(default_factory=dict)


def split_validation(train_ids: Sequence[str], fraction: float, seed: int,
                     groups: Mapping[str, str] | None = None) -> tuple[list[str], list[str]]:
    """Seeded hold-out of ``fraction`` of ``train_ids`` (at least 1 when there are 2+) for early stopping.

    With ``groups`` (case id -> patient id) whole patients are held out, drawn in a seeded order
    until at least the ``fraction`` of cases is reached (and one patient stays for training).
    """
    ids = sorted(train_ids)
    if len(ids) < 2 or fraction <= 0:
        return ids, []
    rng = np.random.default_rng(seed)
    n_val = min(len(ids) - 1, max(1, int(round(fraction * len(ids)))))
    if groups is None:
        val = set(rng.choice(ids, size=n_val, replace=False).tolist())
        return [i for i in ids if i not in val], sorted(val)
    patients = sorted({str(groups[i]) for i in ids})
    if len(patients) < 2:
        return ids, []
    val_patients: set[str] = set()
    held = 0
    for patient in rng.permutation(patients)[:-1]:
        if held >= n_val:
            break
        val_patients.add(str(patient))
        held += sum(1 for i in ids if str(groups[i]) == patient)
    return [i for i in ids if str(groups[i]) not in val_patients], sorted(i for i in ids if str(groups[i]) in val_patients)


def manual_mask(case: SegCase, on_grid: sitk.Image, mask_label: int, grid_tolerance_mm: float) -> sitk.Image:
    """The case's manual mask (label map, RTSTRUCT or SEG) on ``on_grid``, its original CT's grid
    (e.g. the automatic mask written there): the reference of Dice, HD95 and volume difference."""
    return read_lesion_mask(case.original_mask, on_grid, label=mask_label, roi=case.original_roi,
                            seg_segment=case.original_seg_segment, case_id=case.case_id,
                            grid_tolerance_mm=grid_tolerance_mm, reference_image_path=case.original_image)


def check_folds(cases: Sequence[SegCase], folds: Mapping[str, int]) -> list[int]:
    """The sorted fold numbers; FoldAssignmentError naming cases missing from either side."""
    ids = {c.case_id for c in cases}
    no_fold = sorted(ids - set(folds))
    if no_fold:
        raise FoldAssignmentError(
            f"{len(no_fold)} case(s) have no fold in splits 'all_folds': {', '.join(no_fold[:10])}"
        )
    unknown = sorted(set(folds) - ids)
    if unknown:
        raise FoldAssignmentError(
            f"splits 'all_folds' names {len(unknown)} case(s) missing from the preprocessed cases: "
            f"{', '.join(unknown[:10])}"
        )
    return sorted({int(folds[c.case_id]) for c in cases})


def plot_curves(histories: Mapping[int, Sequence[Mapping[str, float]]], title: str = ""):
    """Loss and Dice per epoch for each fold (like the study's Fig. 3): a matplotlib Figure."""
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(11, 4))
    for fold, hist in sorted(histories.items()):
        epochs = [h["epoch"] for h in hist]
        (line,) = ax_loss.plot(epochs, [h["train_loss"] for h in hist], label=f"fold {fold} train")
        ax_loss.plot(epochs, [h["val_loss"] for h in hist], linestyle="--", color=line.get_color())
        ax_dice.plot(epochs, [h["val_dice"] for h in hist], color=line.get_color(), label=f"fold {fold}")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("Dice + CE loss (solid: train, dashed: validation)")
    ax_dice.set_xlabel("epoch")
    ax_dice.set_ylabel("validation Dice")
    ax_dice.set_ylim(0, 1)
    ax_dice.legend(fontsize=7, ncol=2)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def run_cross_validation(
    cases: Sequence[SegCase],
    folds: Mapping[str, int],
    spec: PlannedSegmentSpec,
    settings: InferenceSettings,
    *,
    seed: int,
    mask_label: int,
    grid_tolerance_mm: float,
    num_threads: int,
    figure_dpi: int,
    tracker: Tracker | None = None,
    fold_params: Mapping[str, Any] | None = None,
    only_folds: Sequence[int] | None = None,
    groups: Mapping[str, str] | None = None,
) -> CVResult:
    """Train one model per fold and write every case's out-of-fold mask into ``spec.masks_dir``.

    Args:
        cases: the preprocessed cases (with their original image and manual mask paths).
        folds: case_id -> fold number (``splits.json`` ``all_folds``).
        spec: the ``segment`` params (profile merged): the network (``model``, ``networks``),
            training, ``val_fraction`` (of each fold's training cases, held out for early
            stopping), ``masks_dir`` (replaced atomically once every case has its mask),
            ``work_dir`` (checkpoints and per-fold curve images), ``parallel_folds``.
        settings: how the folds' networks segment their held-out cases (threshold, windows...).
        seed: fold ``k`` is seeded with ``seed + k``.
        mask_label: the lesion value of the manual masks and of the written automatic masks.
        grid_tolerance_mm: how far a manual mask's grid may differ from its CT's (mm).
        num_threads: torch threads in all; ``parallel_folds`` folds share them.
        figure_dpi: resolution of the per-fold curve images (``evaluate.figure_dpi``).
        tracker: one nested run ``fold-<k>`` per fold, inside whatever run the caller opened.
        fold_params: extra params logged on every fold run (e.g. the network's sizes).
        only_folds: run just these folds (debugging, benchmarks); masks are then written only
            for their cases.
        groups: case id -> patient id (splits' ``groups``): the early-stopping hold-out of each
            fold then keeps patients whole too. None: the cases are split one by one.

    ``spec.parallel_folds`` > 1 trains that many folds at once in forked worker processes (CPU
    only): small networks use 2 cores better as two 1-thread folds than as one 2-thread fold
    (1.6x the throughput of the cpu profile). Each fold is seeded by its number, so only the
    thread count (floating-point summation order) differs from a sequential run; the nested runs
    are replayed into ``tracker`` in fold order.

    Raises:
        FoldAssignmentError: cases and folds disagree.
        CaseInferenceError: a case got no mask; no partial mask folder is left.
    """
    tracker = tracker or NullTracker()
    work_dir = Path(spec.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    fold_ids = [f for f in check_folds(cases, folds) if only_folds is None or f in {int(k) for k in only_folds}]
    by_id = {c.case_id: c for c in cases}
    log.info("loading %d preprocessed volumes", len(cases))
    volumes = {c.case_id: load_volume(c) for c in progress(cases, total=len(cases), desc="load")}
    parallel = _parallel_folds(spec.parallel_folds, len(fold_ids), spec.device)
    threads = max(1, int(num_threads) // parallel)

    rows: list[dict[str, Any]] = []
    results: list[FoldResult] = []
    best_fold, best_dice, best_model, best_run = -1, -math.inf, None, None
    with atomic_path(spec.masks_dir, is_dir=True) as tmp_masks:
        jobs = [_fold_job(fold, folds, spec, settings, seed=seed, groups=groups, threads=threads, masks_dir=Path(tmp_masks),
                          work_dir=work_dir, mask_label=mask_label, grid_tolerance_mm=grid_tolerance_mm,
                          figure_dpi=figure_dpi, fold_params=fold_params) for fold in fold_ids]
        if parallel > 1:
            log.info("training %d folds, %d at a time (%d torch thread(s) each)", len(jobs), parallel, threads)
            outcomes = _run_parallel(jobs, by_id, volumes, tracker, parallel)
        else:
            outcomes = (_train_fold(job, by_id, volumes, tracker) for job in jobs)
        for fold_result, fold_rows, model in outcomes:
            rows.extend(fold_rows)
            results.append(fold_result)
            if fold_result.best_val_dice > best_dice:
                best_fold, best_dice, best_run = fold_result.fold, fold_result.best_val_dice, fold_result.run_id
                best_model = model
        _check_masks_written(Path(tmp_masks), {cid for cid in by_id if int(folds[cid]) in fold_ids})
    for fold in fold_ids:  # every fold done and its masks in place: nothing left to resume
        resume_path(work_dir, fold).unlink(missing_ok=True)
    return CVResult(case_rows=rows, folds=results, best_fold=best_fold, best_model=best_model, best_run_id=best_run)


def _fold_job(fold: int, folds: Mapping[str, int], spec: PlannedSegmentSpec, settings: InferenceSettings, *, seed: int,
              groups: Mapping[str, str] | None, threads: int, masks_dir: Path, work_dir: Path, mask_label: int,
              grid_tolerance_mm: float, figure_dpi: int, fold_params: Mapping[str, Any] | None) -> _FoldJob:
    """Fold ``fold``'s job: its held-out cases, its training cases less the early-stopping
    hold-out (:func:`split_validation`, seeded ``seed + fold``), and how it trains and writes."""
    test_ids = sorted(cid for cid in folds if int(folds[cid]) == fold)
    train_all = sorted(cid for cid in folds if int(folds[cid]) != fold)
    train_ids, val_ids = split_validation(train_all, spec.val_fraction, seed + fold, groups)
    return _FoldJob(fold, train_ids, val_ids, test_ids, spec, settings, seed + fold, threads, masks_dir, work_dir,
                    mask_label, grid_tolerance_mm, figure_dpi, dict(fold_params or {}))


def _check_masks_written(masks_dir: Path, expected: set[str]) -> None:
    """Every ``expected`` case has its automatic mask in ``masks_dir``, else a :class:`CaseInferenceError`."""
    written = {p.name.removesuffix(".nii.gz") for p in masks_dir.glob("*.nii.gz")}
    missing = sorted(expected - written)
    if missing:
        raise CaseInferenceError(f"no automatic mask was written for case(s): {', '.join(missing)}")


@dataclass
class _FoldJob:
    """Everything one fold needs besides the volumes (picklable)."""

    fold: int
    train_ids: list[str]
    val_ids: list[str]
    test_ids: list[str]
    spec: PlannedSegmentSpec
    settings: InferenceSettings
    seed: int
    threads: int
    masks_dir: Path
    work_dir: Path
    mask_label: int
    grid_tolerance_mm: float
    figure_dpi: int
    fold_params: dict[str, Any]


def resume_path(work_dir: Path, fold: int) -> Path:
    """Fold ``fold``'s whole training state, written after every epoch, removed once the run completes."""
    return Path(work_dir) / f"fold-{fold}.resume.pt"


def _parallel_folds(requested: int, n_folds: int, device: str) -> int:
    """How many folds to train at once: ``requested`` capped by the folds; 1 on CUDA or without fork."""
    import multiprocessing

    from bonemet.segmentation.training import resolve_device

    n = max(1, min(int(requested), n_folds))
    if n > 1 and resolve_device(device).type != "cpu":
        log.warning("parallel_folds %d ignored: folds share one %s device, trained one at a time", n, device)
        return 1
    if n > 1 and "fork" not in multiprocessing.get_all_start_methods():
        log.warning("parallel_folds %d ignored: this platform cannot fork worker processes", n)
        return 1
    return n


def _train_fold(job: _FoldJob, by_id: Mapping[str, SegCase], volumes: Mapping[str, Any],
                tracker: Tracker) -> tuple[FoldResult, list[dict[str, Any]], Any]:
    """Train one fold, write its out-of-fold masks, log its nested run; (result, case rows, best model on CPU)."""
    import matplotlib.pyplot as plt
    import torch

    fold, spec = job.fold, job.spec
    rows: list[dict[str, Any]] = []
    with tracker.run(f"fold-{fold}", tags={"fold": str(fold)}, nested=True) as run_id:
        tracker.log_params({
            "train": spec.train.model_dump(mode="json"), "augment": spec.augment.model_dump(mode="json"),
            "inference": spec.inference.model_dump(mode="json"), "roi_size": list(spec.roi_size),
            "distill_weight": spec.distill_weight, **job.fold_params, "fold": fold, "seed": job.seed,
            "num_threads": job.threads, "n_train": len(job.train_ids), "n_val": len(job.val_ids),
            "n_test": len(job.test_ids), "val_fraction": spec.val_fraction,
        })
        seed_everything(job.seed)
        model = network_from_spec(spec)
        n_params = count_parameters(model)
        log.info("fold %d: train %d, validation %d, out-of-fold %d cases", fold, len(job.train_ids),
                 len(job.val_ids), len(job.test_ids))
        checkpoint = job.work_dir / f"fold-{fold}.pt"
        result = train_model(
            model, [volumes[i] for i in job.train_ids], [volumes[i] for i in job.val_ids], spec, seed=job.seed,
            tracker=tracker, checkpoint_path=checkpoint, resume_path=resume_path(job.work_dir, fold),
            progress_desc=f"fold {fold} epochs",
        )
        tracker.set_tags({"stop_reason": result.stop_reason})
        start = time.perf_counter()
        for cid in job.test_ids:
            case = by_id[cid]
            mask = predict_case(result.model, case, job.settings, device=result.device)
            # the automatic mask carries the lesion label of the manual masks (data.mask_label)
            write_image(sitk.Cast(mask * job.mask_label, sitk.sitkUInt8), job.masks_dir / f"{cid}.nii.gz")
            row: dict[str, Any] = {"case_id": cid, "fold": fold}
            if case.original_mask is not None:
                row.update(case_metrics(mask, manual_mask(case, mask, job.mask_label, job.grid_tolerance_mm),
                                        cid, grid_tolerance_mm=job.grid_tolerance_mm))
            rows.append(row)
        infer_s = (time.perf_counter() - start) / max(1, len(job.test_ids))
        fold_rows = [r for r in rows if "dice" in r]
        fold_dice = float(np.mean([r["dice"] for r in fold_rows])) if fold_rows else math.nan
        tracker.log_metrics({
            "best_val_dice": result.best_val_dice, "best_epoch": result.best_epoch,
            "train_seconds": result.train_seconds, "infer_seconds_per_case": infer_s,
            "n_parameters": n_params, "epochs": len(result.history), "planned_epochs": result.planned_epochs,
            "steps": result.steps, "resumed_from_epoch": result.resumed_from, **({"oof_dice_mean": fold_dice} if fold_rows else {}),
        })
        fig = plot_curves({fold: result.history}, title=f"fold {fold}")
        png = job.work_dir / f"fold-{fold}_curves.png"
        fig.savefig(png, dpi=job.figure_dpi)
        plt.close(fig)
        tracker.log_artifact(png, artifact_path="curves")
        if checkpoint.exists():
            tracker.log_artifact(checkpoint, artifact_path="checkpoint")
        fold_result = FoldResult(
            fold=fold, history=result.history, best_epoch=result.best_epoch,
            best_val_dice=result.best_val_dice, n_train=len(job.train_ids), n_val=len(job.val_ids),
            n_test=len(job.test_ids), train_seconds=result.train_seconds, infer_seconds_per_case=infer_s,
            n_parameters=n_params, run_id=run_id, stop_reason=result.stop_reason,
            planned_epochs=result.planned_epochs, steps=result.steps, resumed_from=result.resumed_from,
        )
        log.info("fold %d: best val Dice %.4f (epoch %d), out-of-fold Dice %.4f, %.0f s train, %d epochs (stopped: %s)",
                 fold, result.best_val_dice, result.best_epoch, fold_dice, result.train_seconds,
                 len(result.history), result.stop_reason)
    best_model = result.model.to("cpu")
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return fold_result, rows, best_model


#: Set in the parent just before the worker processes fork; they read it instead of unpickling volumes.
_FORK_STATE: dict[str, Any] = {}


def _fold_worker(job: _FoldJob) -> tuple[list, FoldResult, list[dict[str, Any]], dict[str, Any]]:
    """Worker process: train one fold with ``job.threads`` torch threads and a call buffer as its
    tracker; the model goes back as a state dict."""
    import torch

    from bonemet.tracking.base import CallBuffer

    torch.set_num_threads(job.threads)  # this worker process's share of the cores
    buffer = CallBuffer()
    with log_context(f"[fold {job.fold}]"):  # the workers' lines interleave: each names its fold
        fold_result, rows, model = _train_fold(job, _FORK_STATE["by_id"], _FORK_STATE["volumes"], buffer)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return buffer.calls, fold_result, rows, state


def _run_parallel(jobs: Sequence[_FoldJob], by_id: Mapping[str, SegCase], volumes: Mapping[str, Any],
                  tracker: Tracker, parallel: int):
    """Train folds in ``parallel`` forked processes; yield their outcomes in fold order.

    Each fold's tracker calls are replayed into ``tracker`` in the parent (in fold order, so the
    nested runs appear as in a sequential run); a fold's failure (e.g. a case whose inference
    fails) is raised here, naming the case.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from bonemet.tracking.base import replay_calls

    _FORK_STATE.update(by_id=by_id, volumes=volumes)
    try:
        with ProcessPoolExecutor(max_workers=parallel, mp_context=multiprocessing.get_context("fork"),
                                 initializer=die_with_parent) as pool:
            futures = [pool.submit(_fold_worker, job) for job in jobs]
            job_of = {job.fold: job for job in jobs}
            for future in futures:
                calls, fold_result, rows, state = future.result()
                run_ids = replay_calls(calls, tracker)
                fold_result.run_id = run_ids[0] if run_ids else None
                model = network_from_spec(job_of[fold_result.fold].spec)
                model.load_state_dict(state)
                yield fold_result, rows, model.eval()
    finally:
        _FORK_STATE.clear()
