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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bonemet.data.io import read_mask, write_image
from bonemet.segmentation.data import SegCase, load_volume
from bonemet.segmentation.inference import CaseInferenceError, predict_case
from bonemet.segmentation.metrics import case_metrics
from bonemet.segmentation.training import TrainConfig, count_parameters, train_model
from bonemet.tracking.base import NullTracker, Tracker
from bonemet.utils import atomic_path, progress, seed_everything

log = logging.getLogger(__name__)


class FoldAssignmentError(ValueError):
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


@dataclass
class CVResult:
    """Per-case metrics (with their fold), per-fold results and the best fold's model."""

    case_rows: list[dict[str, Any]]
    folds: list[FoldResult]
    best_fold: int
    best_model: Any = None
    best_run_id: str | None = None
    extra: dict = field(default_factory=dict)


def split_validation(train_ids: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded hold-out of ``fraction`` of ``train_ids`` (at least 1 when there are 2+) for early stopping."""
    ids = sorted(train_ids)
    if len(ids) < 2 or fraction <= 0:
        return ids, []
    rng = np.random.default_rng(seed)
    n_val = min(len(ids) - 1, max(1, int(round(fraction * len(ids)))))
    val = set(rng.choice(ids, size=n_val, replace=False).tolist())
    return [i for i in ids if i not in val], sorted(val)


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
    import matplotlib

    matplotlib.use("Agg")
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
    model_factory: Callable[[], Any],
    config: TrainConfig,
    masks_dir: str | Path,
    work_dir: str | Path,
    tracker: Tracker | None = None,
    val_fraction: float = 0.1,
    threshold: float = 0.5,
    largest_component: bool = True,
    fold_params: Mapping[str, Any] | None = None,
    only_folds: Sequence[int] | None = None,
) -> CVResult:
    """Train one model per fold and write every case's out-of-fold mask into ``masks_dir``.

    Args:
        cases: the preprocessed cases (with their original image and manual mask paths).
        folds: case_id -> fold number (``splits.json`` ``all_folds``).
        model_factory: builds a fresh network for each fold.
        config: training settings shared by the folds (seeded per fold: ``seed + fold``).
        masks_dir: output folder, replaced atomically once every case has its mask.
        work_dir: checkpoints and per-fold curve images (``fold-<k>.pt``, ``fold-<k>_curves.png``).
        tracker: one nested run ``fold-<k>`` per fold, inside whatever run the caller opened.
        val_fraction: fraction of each fold's training cases held out for early stopping.
        threshold: lesion probability threshold on the original grid.
        largest_component: keep only the largest connected component of each mask.
        fold_params: extra params logged on every fold run (e.g. the network's sizes).
        only_folds: run just these folds (debugging, benchmarks); masks are then written only
            for their cases.

    Raises:
        FoldAssignmentError: cases and folds disagree.
        CaseInferenceError: a case could not be segmented (named); no partial ``masks_dir`` is left.
    """
    import matplotlib.pyplot as plt
    import torch

    tracker = tracker or NullTracker()
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    fold_ids = check_folds(cases, folds)
    if only_folds is not None:
        fold_ids = [f for f in fold_ids if f in {int(k) for k in only_folds}]
    by_id = {c.case_id: c for c in cases}
    log.info("loading %d preprocessed volumes", len(cases))
    volumes = {c.case_id: load_volume(c) for c in progress(cases, total=len(cases), desc="load")}

    rows: list[dict[str, Any]] = []
    results: list[FoldResult] = []
    best_fold, best_dice, best_model, best_run = -1, -math.inf, None, None
    with atomic_path(masks_dir, is_dir=True) as tmp_masks:
        for fold in fold_ids:
            test_ids = sorted(cid for cid in by_id if int(folds[cid]) == fold)
            train_all = sorted(cid for cid in by_id if int(folds[cid]) != fold)
            train_ids, val_ids = split_validation(train_all, val_fraction, config.seed + fold)
            fold_config = TrainConfig(**{**config.as_dict(), "seed": config.seed + fold})
            with tracker.run(f"fold-{fold}", tags={"fold": str(fold)}, nested=True) as run_id:
                tracker.log_params({
                    **fold_config.as_dict(), **dict(fold_params or {}), "fold": fold, "n_train": len(train_ids),
                    "n_val": len(val_ids), "n_test": len(test_ids), "val_fraction": val_fraction,
                })
                seed_everything(fold_config.seed)
                model = model_factory()
                n_params = count_parameters(model)
                log.info("fold %d: train %d, validation %d, out-of-fold %d cases", fold, len(train_ids),
                         len(val_ids), len(test_ids))
                checkpoint = work_dir / f"fold-{fold}.pt"
                result = train_model(
                    model, [volumes[i] for i in train_ids], [volumes[i] for i in val_ids], fold_config, tracker,
                    checkpoint_path=checkpoint,
                )
                start = time.perf_counter()
                for cid in test_ids:
                    case = by_id[cid]
                    mask = predict_case(
                        result.model, case, fold_config.roi_size, fold_config.overlap, fold_config.sw_batch_size,
                        result.device, threshold, largest_component, mirror_axes=fold_config.mirror_axes,
                    )
                    write_image(mask, tmp_masks / f"{cid}.nii.gz")
                    row: dict[str, Any] = {"case_id": cid, "fold": fold}
                    if case.original_mask is not None:
                        ref = read_mask(case.original_mask, label=1, case_id=cid)
                        row.update(case_metrics(mask, ref, case_id=cid))
                    rows.append(row)
                infer_s = (time.perf_counter() - start) / max(1, len(test_ids))
                fold_rows = [r for r in rows if r["fold"] == fold and "dice" in r]
                fold_dice = float(np.mean([r["dice"] for r in fold_rows])) if fold_rows else math.nan
                tracker.log_metrics({
                    "best_val_dice": result.best_val_dice, "best_epoch": result.best_epoch,
                    "train_seconds": result.train_seconds, "infer_seconds_per_case": infer_s,
                    "n_parameters": n_params, **({"oof_dice_mean": fold_dice} if fold_rows else {}),
                })
                fig = plot_curves({fold: result.history}, title=f"fold {fold}")
                png = work_dir / f"fold-{fold}_curves.png"
                fig.savefig(png, dpi=100)
                plt.close(fig)
                tracker.log_artifact(png, artifact_path="curves")
                if checkpoint.exists():
                    tracker.log_artifact(checkpoint, artifact_path="checkpoint")
                results.append(FoldResult(
                    fold=fold, history=result.history, best_epoch=result.best_epoch,
                    best_val_dice=result.best_val_dice, n_train=len(train_ids), n_val=len(val_ids),
                    n_test=len(test_ids), train_seconds=result.train_seconds, infer_seconds_per_case=infer_s,
                    n_parameters=n_params, run_id=run_id,
                ))
                log.info("fold %d: best val Dice %.4f (epoch %d), out-of-fold Dice %.4f, %.0f s train",
                         fold, result.best_val_dice, result.best_epoch, fold_dice, result.train_seconds)
                if result.best_val_dice > best_dice:
                    best_fold, best_dice, best_run = fold, result.best_val_dice, run_id
                    best_model = result.model.to("cpu")
                del model
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        written = {p.name.removesuffix(".nii.gz") for p in Path(tmp_masks).glob("*.nii.gz")}
        expected = {cid for cid in by_id if int(folds[cid]) in fold_ids}
        missing = sorted(expected - written)
        if missing:
            raise CaseInferenceError(f"no automatic mask was written for case(s): {', '.join(missing)}")
    return CVResult(case_rows=rows, folds=results, best_fold=best_fold, best_model=best_model, best_run_id=best_run)
