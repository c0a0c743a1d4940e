"""Training loop for the segmentation networks (MISSU and the MONAI baselines).

SGD with momentum, a poly or cosine learning-rate schedule, MONAI ``DiceCELoss`` plus MISSU's
self-distillation term (weight ``distill_weight``; networks that return plain logits add
nothing), seeded MONAI augmentation, early stopping on the validation loss and the best
checkpoint chosen by validation Dice. Runs on CPU by default and on CUDA when present, with
bf16/fp16 autocast there.

Two schedules: ``max_epochs`` epochs (the GPU profile), or a budget of optimiser steps per fold
(``train.max_steps``, planned from the profile's compute budget on the cpu profile): the fold trains
the whole epochs that hold those steps (at most ``max_epochs``) and the learning rate anneals over
them. No clock is read for any decision: the same code, data, params and thread count train the
same weights on any machine and under any load. A fold stops for one of :data:`STOP_REASONS`. With a resume path the whole training state is written
atomically after every epoch, and a rerun of the same fold continues from it.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bonemet.data.masks import dice as dice_score
from bonemet.errors import UserError
from bonemet.segmentation.inference import autocast_context, sliding_window_logits
from bonemet.tracking.base import NullTracker, Tracker
from bonemet.utils import atomic_path, progress

if TYPE_CHECKING:  # pragma: no cover
    from bonemet.config import PlannedSegmentSpec, PlannedSegTrainSpec

log = logging.getLogger(__name__)


class TrainingConfigError(UserError, ValueError):
    """A training setting cannot be used (e.g. no training cases)."""


class EarlyStopping:
    """Stop when the monitored value (lower is better) has not improved for ``patience`` steps
    (None: never; the best value is still tracked)."""

    def __init__(self, patience: int | None, min_delta: float) -> None:
        if patience is not None and patience < 1:
            raise TrainingConfigError(f"patience must be >= 1; found {patience}")
        self.patience = patience
        self.min_delta = min_delta
        self.best = math.inf
        self.bad_steps = 0

    def step(self, value: float) -> bool:
        """Record ``value``; True when training should stop."""
        if value < self.best - self.min_delta:
            self.best = value
            self.bad_steps = 0
        else:
            self.bad_steps += 1
        return self.patience is not None and self.bad_steps >= self.patience


#: why a fold's training ended: its step budget's epochs done, the validation Dice converged, no lower
#: validation loss for ``patience`` epochs, or the epoch schedule done
STOP_REASONS = ("budget", "converged", "patience", "max_epochs")


@dataclass
class TrainResult:
    """A trained model (best-Dice weights loaded) and its per-epoch history."""

    model: Any
    history: list[dict[str, float]]
    best_epoch: int
    best_val_dice: float
    stopped_early: bool
    train_seconds: float
    device: str
    #: one of :data:`STOP_REASONS`
    stop_reason: str = "max_epochs"
    #: the epochs the schedule annealed over (max_epochs, or the epochs that hold the step budget)
    planned_epochs: int = 0
    #: optimiser steps taken
    steps: int = 0
    #: the epoch training resumed after (0: started afresh)
    resumed_from: int = 0


def converged(dices: Sequence[float], window: int | None, tol: float) -> bool:
    """True when the last ``window`` validation Dice values span at most ``tol`` and none beats the
    best before them (``window`` None: never), once the Dice has risen above ``tol``: a network that
    has not yet found the validation lesions (Dice flat at 0 while its loss still falls, as in the
    first epochs on a noisy, thick-slice cohort) has not converged, it has not started."""
    if window is None or len(dices) <= window:
        return False
    last, before = dices[-window:], dices[:-window]
    return max(before) > tol and max(last) - min(last) <= tol and max(last) <= max(before)


def budget_epochs(max_steps: int, steps_per_epoch: int, train: PlannedSegTrainSpec) -> int:
    """Whole epochs of ``steps_per_epoch`` optimiser steps that hold ``max_steps`` (rounded up),
    within ``[min_epochs, max_epochs]``.

    Raises:
        TrainingConfigError: the budget is less than one epoch.
    """
    if max_steps < steps_per_epoch:
        raise TrainingConfigError(
            f"segment.train.max_steps {max_steps} is less than one epoch ({steps_per_epoch} optimiser steps: the "
            f"training cases over segment.train.batch_size): raise segment.train.max_steps (or "
            f"segment.plan.train_megavoxels when it is planned) or lower the batch size")
    epochs = math.ceil(max_steps / steps_per_epoch)
    if epochs > train.max_epochs:
        log.warning("segment.train.max_steps %d needs %d epochs of %d steps, more than segment.train.max_epochs %d: "
                    "the fold stops after %d epochs (raise max_epochs or lower the budget)", max_steps, epochs,
                    steps_per_epoch, train.max_epochs, train.max_epochs)
    return int(min(train.max_epochs, max(train.min_epochs, epochs)))


def resolve_device(name: str):
    """``torch.device`` for 'auto' (CUDA when available), 'cpu' or 'cuda'."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def split_output(output: Any) -> tuple[Any, Any]:
    """``(logits, distillation_loss or None)`` from a network output (tensor or tuple)."""
    if isinstance(output, tuple | list):
        return output[0], (output[1] if len(output) > 1 else None)
    return output, None


def _lr_lambda(schedule: str, horizon: int, power: float) -> Callable[[int], float]:
    """The schedule over ``horizon`` epochs."""
    if schedule == "poly":
        return lambda epoch: max(0.0, 1.0 - epoch / horizon) ** power
    if schedule == "cosine":
        return lambda epoch: 0.5 * (1.0 + math.cos(math.pi * min(epoch, horizon) / horizon))
    return lambda epoch: 1.0


def make_loss(train: PlannedSegTrainSpec):
    """MONAI DiceCELoss on softmax outputs against integer labels (B, 1, D, H, W)."""
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=train.lambda_dice, lambda_ce=train.lambda_ce)


def evaluate(model: Any, items: Sequence[Mapping[str, Any]], spec: PlannedSegmentSpec, loss_fn: Any,
             device: Any) -> tuple[float, float]:
    """Mean validation loss and mean Dice per case.

    ``spec.train.val_mode`` "full": sliding-window inference over whole volumes (what the
    out-of-fold prediction does, without mirroring); "crops": one lesion-centred ``roi_size``
    crop per case (a cheap proxy for CPU budgets). The windows overlap by
    ``spec.train.val_overlap`` (``spec.inference.overlap`` when null): 0 makes full validation
    about 3x cheaper on a CPU.
    """
    import torch

    from bonemet.segmentation.data import lesion_centred_crop

    train = spec.train
    overlap = spec.inference.overlap if train.val_overlap is None else train.val_overlap
    losses, dices = [], []
    for item in items:
        if train.val_mode == "crops":
            item = lesion_centred_crop(item, spec.roi_size)
        logits = sliding_window_logits(
            model, item["image"], spec.roi_size, overlap=overlap, sw_batch_size=spec.inference.sw_batch_size,
            device=device, mirror_axes=(), channels_last=train.channels_last,
        )
        label = torch.as_tensor(item["label"])[None].to(device)
        with torch.no_grad():
            losses.append(float(loss_fn(logits, label)))
        pred = logits.argmax(dim=1)[0].cpu().numpy()
        dices.append(dice_score(pred, item["label"][0] > 0.5))
    return float(np.mean(losses)), float(np.mean(dices))


def _training_loader(train_items: Sequence[Mapping[str, Any]], spec: PlannedSegmentSpec, seed: int) -> Any:
    """A seeded MONAI DataLoader of augmented crops (see :func:`bonemet.segmentation.data.train_transforms`)."""
    import torch
    from monai.data import DataLoader, Dataset

    from bonemet.segmentation.data import train_transforms, with_crop_indices

    transform = train_transforms(spec.roi_size, spec.augment, num_samples=spec.train.num_samples, seed=seed,
                                 indexed=True)
    dataset = Dataset([with_crop_indices(it, spec.roi_size) for it in train_items], transform=transform)
    generator = torch.Generator().manual_seed(seed)
    # Workers (persistent: started once, not per epoch) augment the next crops while the network
    # trains on these; MONAI's DataLoader seeds each worker from ``generator``, so a run is
    # reproducible for a given num_workers.
    workers = spec.train.num_workers
    return DataLoader(dataset, batch_size=spec.train.batch_size, shuffle=True, num_workers=workers,
                      generator=generator, persistent_workers=workers > 0)


def _optimizer(model: Any, train: PlannedSegTrainSpec, horizon: int) -> tuple[Any, Any]:
    """SGD with (Nesterov) momentum and the per-epoch learning-rate schedule over ``horizon`` epochs."""
    import torch

    optimizer = torch.optim.SGD(
        model.parameters(), lr=train.lr, momentum=train.momentum, nesterov=train.nesterov and train.momentum > 0,
        weight_decay=train.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(train.lr_schedule, horizon,
                                                                        train.poly_power))
    return optimizer, scheduler


@dataclass
class _Step:
    """What one gradient step needs besides the batch: loss, optimiser, device and precision."""

    model: Any
    optimizer: Any
    loss_fn: Any
    device: Any
    memory_format: Any
    distill_weight: float
    grad_clip: float | None
    amp: bool
    scaler: Any = None

    def __call__(self, batch: Mapping[str, Any]) -> float:
        import torch

        x = batch["image"].to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        y = batch["label"].to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast_context(self.device if self.amp else "cpu"):
            logits, distill = split_output(self.model(x))
            loss = self.loss_fn(logits.float(), y)
            if distill is not None and self.distill_weight:
                loss = loss + self.distill_weight * distill.float()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return float(loss.detach())


class _BestCheckpoint:
    """The weights of the epoch with the best validation Dice, in memory and on disk."""

    def __init__(self, path: str | Path | None, spec: PlannedSegmentSpec) -> None:
        self.path, self.spec = path, spec
        self.dice, self.epoch, self.state = -math.inf, 0, None

    def update(self, model: Any, epoch: int, val_dice: float) -> None:

        if val_dice <= self.dice:
            return
        self.dice, self.epoch = float(val_dice), epoch
        self.state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        if self.path is not None:
            save_checkpoint({"state_dict": self.state, "epoch": epoch, "val_dice": self.dice,
                             "spec": spec_json(self.spec)}, self.path)


def spec_json(spec: PlannedSegmentSpec, **kwargs: Any) -> dict[str, Any]:
    """``spec`` as JSON values to log or save: ``tune.storage`` with any password masked."""
    from bonemet.search import storage_for_log

    doc = spec.model_dump(mode="json", **kwargs)
    if isinstance(doc.get("tune"), dict) and doc["tune"].get("storage") is not None:
        doc["tune"]["storage"] = storage_for_log(doc["tune"]["storage"])
    return doc


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> None:
    """``torch.save`` of ``state`` to ``path``, atomically and byte-reproducibly: torch names the
    archive inside the file after the file it writes to (a random temporary name here), so the bytes
    are made in memory first, under torch's fixed name for a buffer."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def _rng_state(loader: Any) -> dict[str, Any]:
    import random

    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    # tensors and plain values only: the state loads with torch.load(weights_only=True)
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "loader": loader.generator.get_state() if loader.generator is not None else None}


def _set_rng_state(state: Mapping[str, Any], loader: Any) -> None:
    import random

    import torch

    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if state.get("loader") is not None and loader.generator is not None:
        loader.generator.set_state(state["loader"])


def resume_key(spec: PlannedSegmentSpec, train_items: Sequence[Mapping[str, Any]], val_items: Sequence[Mapping[str, Any]],
               seed: int) -> str:
    """What a resume checkpoint must have been written for: the settings (the step budget among
    them), the cases and the seed."""
    import hashlib
    import json

    doc = {"spec": spec.model_dump(mode="json"), "train": [str(i.get("case_id")) for i in train_items],
           "val": [str(i.get("case_id")) for i in val_items], "seed": seed}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _load_resume(path: Path | None, key: str) -> dict[str, Any] | None:
    """The resume state at ``path`` when it was written for ``key`` (else None: start afresh)."""
    import torch

    if path is None or not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a checkpoint that cannot be read is only a lost head start
        log.warning("resume checkpoint %s unreadable (%s): training from the start", path, exc)
        return None
    if not isinstance(state, dict) or state.get("key") != key:
        log.info("resume checkpoint %s was written for other settings or cases: training from the start", path)
        return None
    return state


@dataclass
class _TrainingState:
    """A fold's training between epochs: what the epoch loop updates, and what its resume
    checkpoint holds (:func:`_save_resume`) and gives back (:meth:`restore`)."""

    #: what a resume checkpoint must have been written for (:func:`resume_key`)
    key: str
    model: Any
    optimizer: Any
    scheduler: Any
    #: one gradient step; carries the loss, the device and the AMP grad scaler
    step: _Step
    loader: Any
    #: the epochs the schedule anneals over
    horizon: int
    stopper: EarlyStopping
    best: _BestCheckpoint
    history: list[dict[str, float]] = field(default_factory=list)
    #: the last epoch done (0: none)
    epoch: int = 0
    #: "" while training goes on; else why it ended (:data:`STOP_REASONS`, or "pruned")
    stop_reason: str = "max_epochs"
    finished: bool = False
    #: the wall seconds spent before this run (those of the runs it resumes)
    spent: float = 0.0

    def result(self, start: float, resumed_from: int) -> TrainResult:
        """The trained model, in eval mode with the best-Dice weights, and its history (``start``:
        the ``time.perf_counter()`` the training's wall time counts from)."""
        best = self.best
        if best.state is not None:
            self.model.load_state_dict(best.state)
        self.model.eval()
        stop_reason = self.stop_reason or "max_epochs"
        return TrainResult(
            model=self.model, history=self.history, best_epoch=best.epoch, best_val_dice=best.dice,
            stopped_early=stop_reason in ("patience", "converged"), train_seconds=time.perf_counter() - start,
            device=str(self.step.device), stop_reason=stop_reason, planned_epochs=self.horizon,
            resumed_from=resumed_from, steps=len(self.history) * len(self.loader),
        )

    def restore(self, saved: Mapping[str, Any], resume_path: Path) -> None:
        """Continue from the state :func:`_save_resume` wrote (read by :func:`_load_resume`)."""
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.step.scaler is not None and saved.get("scaler") is not None:
            self.step.scaler.load_state_dict(saved["scaler"])
        self.stopper.best, self.stopper.bad_steps = float(saved["stopper"][0]), int(saved["stopper"][1])
        best = self.best
        best.dice, best.epoch, best.state = float(saved["best"][0]), int(saved["best"][1]), saved["best"][2]
        self.history, self.spent = list(saved["history"]), float(saved["spent"])
        self.stop_reason, self.finished = str(saved["stop_reason"]), bool(saved["finished"])
        _set_rng_state(saved["rng"], self.loader)
        self.epoch = int(saved["epoch"])
        log.info("resuming from epoch %d of %d (%s)", saved["epoch"], self.horizon, resume_path)


def _start_training(model: Any, train_items: Sequence[Mapping[str, Any]], val_items: Sequence[Mapping[str, Any]],
                    spec: PlannedSegmentSpec, seed: int, checkpoint_path: str | Path | None,
                    resume_path: Path | None) -> _TrainingState:
    """Seed, move ``model`` to the device and build its loader, optimiser, schedule and early
    stopping: a fresh training state (epoch 0), or the one at ``resume_path`` when it was written
    for these settings, cases and seed."""
    import torch

    from bonemet.segmentation.networks import seed_everything

    train = spec.train
    seed_everything(seed)
    device = resolve_device(spec.device)
    memory_format = torch.channels_last_3d if train.channels_last else torch.contiguous_format
    model = model.to(device).to(memory_format=memory_format)
    loader = _training_loader(train_items, spec, seed)
    max_steps = train.max_steps
    horizon = train.max_epochs if max_steps is None else budget_epochs(max_steps, len(loader), train)
    optimizer, scheduler = _optimizer(model, train, horizon)
    loss_fn = make_loss(train)
    use_scaler = device.type == "cuda" and spec.amp and not torch.cuda.is_bf16_supported()
    step = _Step(model, optimizer, loss_fn, device, memory_format, spec.distill_weight, train.grad_clip, spec.amp,
                 torch.amp.GradScaler("cuda") if use_scaler else None)
    training = _TrainingState(
        key=resume_key(spec, train_items, val_items, seed), model=model, optimizer=optimizer, scheduler=scheduler,
        step=step, loader=loader, horizon=horizon, stopper=EarlyStopping(train.patience, train.min_delta),
        best=_BestCheckpoint(checkpoint_path, spec),
    )
    saved = _load_resume(resume_path, training.key)
    if saved is not None:
        training.restore(saved, resume_path)
    if max_steps is not None and training.epoch == 0:
        log.info("step budget %d: %d epochs of %d steps, the learning rate annealed over them", max_steps,
                 horizon, len(loader))
    return training


def train_model(
    model: Any,
    train_items: Sequence[Mapping[str, Any]],
    val_items: Sequence[Mapping[str, Any]],
    spec: PlannedSegmentSpec,
    *,
    seed: int,
    tracker: Tracker | None = None,
    checkpoint_path: str | Path | None = None,
    resume_path: str | Path | None = None,
    validate: Callable[[Any, int], tuple[float, float]] | None = None,
    show_progress: bool = False,
    progress_desc: str = "epochs",
    on_epoch: Callable[[int, float], bool] | None = None,
) -> TrainResult:
    """Train ``model`` on in-memory volumes; validate each epoch; keep the best-Dice weights.

    Args:
        model: a torch module returning logits, or ``(logits, distillation_loss)`` in training mode.
        train_items, val_items: dicts ``{"image": (1,D,H,W), "label": (1,D,H,W), "case_id"}``
            (see :func:`bonemet.segmentation.data.load_volume`).
        spec: the ``segment`` params (profile merged): ``train``, ``augment``, ``inference``
            (validation windows), ``roi_size``, ``distill_weight``, ``device``, ``amp``.
        seed: seeds the weights' training, the crops and the augmentation.
        tracker: receives ``train_loss``, ``val_loss``, ``val_dice``, ``lr`` at ``step=epoch``
            (inside whatever run the caller opened).
        checkpoint_path: where the best checkpoint (state dict, epoch, val Dice, spec) is saved.
        resume_path: where the whole training state (weights, optimiser, schedule, early stopping,
            best weights, history, random states, the budget's epoch count) is written after every
            epoch (atomically); when it holds a state written for the same settings, cases and
            seed, training continues after its epoch.
        validate: optional ``(model, epoch) -> (val_loss, val_dice)`` replacing the default
            sliding-window validation (used by tests to script a loss sequence).
        show_progress: log every epoch (otherwise the first and every tenth).
        progress_desc: the label of the epochs' progress bar (e.g. ``fold 3 epochs``).
        on_epoch: optional ``(epoch, best validation Dice so far) -> stop``, called after every
            epoch; True ends training there (``stop_reason`` "pruned": the tuning's pruner).

    The schedule: ``spec.train.max_steps`` optimiser steps (rounded up to whole epochs, at most
    ``max_epochs``; :func:`budget_epochs`), or ``max_epochs`` epochs when it is None.

    Early stopping watches the validation loss (``train.patience`` epochs without an
    improvement of ``train.min_delta``) and the validation Dice (``train.converge_window``,
    ``converge_tol``); the returned model carries the weights of the epoch with the best
    validation Dice. Torch's thread count is the caller's to set.
    """
    from bonemet.config import planned_spec

    spec = planned_spec(spec, "train_model")  # refuses an unplanned `auto`
    tracker = tracker or NullTracker()
    if not train_items:
        raise TrainingConfigError("no training cases")
    resume_path = Path(resume_path) if resume_path is not None else None
    training = _start_training(model, train_items, val_items, spec, seed, checkpoint_path, resume_path)
    model, loader, horizon, max_steps = training.model, training.loader, training.horizon, spec.train.max_steps
    resumed_from = training.epoch
    # wall time is reported (MLflow), never used to decide anything
    start = time.perf_counter() - training.spent
    epochs = range(training.epoch + 1, horizon + 1) if not training.finished else range(0)
    for epoch in progress(epochs, total=len(epochs), desc=progress_desc, unit="epoch"):
        _seed_epoch(loader, seed, epoch)
        record = _train_epoch(training, epoch, val_items, spec, validate)
        tracker.log_metrics({**{k: v for k, v in record.items() if k != "epoch"},
                             "elapsed_s": time.perf_counter() - start}, step=epoch)
        if show_progress or epoch == 1 or epoch % 10 == 0:
            log.info("epoch %d: train loss %.4f, val loss %.4f, val Dice %.4f", epoch, record["train_loss"],
                     record["val_loss"], record["val_dice"])
        training.best.update(model, epoch, record["val_dice"])
        training.stop_reason = _stop_reason(training, epoch, record["val_loss"], spec.train, max_steps)
        if on_epoch is not None and on_epoch(epoch, training.best.dice):
            training.stop_reason = "pruned"
            log.info("pruned at epoch %d (validation Dice %.4f so far)", epoch, training.best.dice)
        training.finished = bool(training.stop_reason)
        if resume_path is not None:
            _save_resume(resume_path, training, time.perf_counter() - start)
        if training.finished:
            break
    return training.result(start, resumed_from)


def _train_epoch(training: _TrainingState, epoch: int, val_items: Sequence[Mapping[str, Any]], spec: PlannedSegmentSpec,
                 validate: Callable[[Any, int], tuple[float, float]] | None) -> dict[str, float]:
    """One epoch: a gradient step per batch, the validation, the schedule's step; its record
    (epoch, train_loss, val_loss, val_dice, lr: the rate the epoch trained with), appended to the
    history."""
    model, step = training.model, training.step
    training.epoch = epoch
    model.train()
    batch_losses = [step(batch) for batch in training.loader]
    lr_now = training.optimizer.param_groups[0]["lr"]
    val_loss, val_dice = validate(model, epoch) if validate is not None else evaluate(
        model, val_items, spec, step.loss_fn, step.device)
    training.scheduler.step()
    record = {
        "epoch": epoch, "train_loss": float(np.mean(batch_losses)), "val_loss": float(val_loss),
        "val_dice": float(val_dice), "lr": float(lr_now),
    }
    training.history.append(record)
    return record


def _stop_reason(training: _TrainingState, epoch: int, val_loss: float, train: PlannedSegTrainSpec,
                 max_steps: int | None) -> str:
    """Why training ends after ``epoch`` (one of :data:`STOP_REASONS`), or "" to go on; counts the
    epoch in the early stopping."""
    patience_out = training.stopper.step(val_loss)
    if epoch >= train.min_epochs and patience_out:
        log.info("early stopping at epoch %d (no lower validation loss for %d epochs)", epoch, train.patience)
        return "patience"
    if epoch >= train.min_epochs and converged([h["val_dice"] for h in training.history], train.converge_window,
                                               train.converge_tol):
        log.info("converged at epoch %d (validation Dice flat for %d epochs)", epoch, train.converge_window)
        return "converged"
    if epoch >= training.horizon:
        if max_steps is not None and training.horizon < train.max_epochs:
            log.info("step budget spent at epoch %d (%d steps)", epoch, epoch * len(training.loader))
            return "budget"
        return "max_epochs"
    return ""


def _seed_epoch(loader: Any, seed: int, epoch: int) -> None:
    """The epoch's crops and augmentations seeded by ``(seed, epoch)`` alone, so a fold resumed
    after epoch k draws what the uninterrupted run drew (augmentation in this process:
    ``train.num_workers`` 0; workers keep their own streams)."""
    epoch_seed = (int(seed) * 100_003 + int(epoch)) % 2**32
    if loader.generator is not None:
        loader.generator.manual_seed(epoch_seed)
    transform = getattr(loader.dataset, "transform", None)
    if loader.num_workers == 0 and hasattr(transform, "set_random_state"):
        transform.set_random_state(seed=epoch_seed)


def _save_resume(path: Path, training: _TrainingState, spent: float) -> None:
    """The whole training state after its last epoch, with the wall seconds ``spent`` so far,
    written atomically (a kill leaves the previous one)."""
    best, stopper, scaler = training.best, training.stopper, training.step.scaler
    state = {
        "key": training.key, "epoch": training.epoch,
        "model": {k: v.detach().cpu() for k, v in training.model.state_dict().items()},
        "optimizer": training.optimizer.state_dict(), "scheduler": training.scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None, "stopper": (stopper.best, stopper.bad_steps),
        "best": (best.dice, best.epoch, best.state), "history": training.history, "spent": spent,
        "horizon": training.horizon, "stop_reason": training.stop_reason or "max_epochs",
        "finished": training.finished, "rng": _rng_state(training.loader),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(state, path)


def tuning_study_name(spec: PlannedSegmentSpec, train_items: Sequence[Mapping[str, Any]],
                      val_items: Sequence[Mapping[str, Any]], seed: int) -> str:
    """The segmentation study's name in a shared storage (``segment.tune.storage``): a digest of
    everything that defines its trials (the ``segment`` settings but ``tune.n_trials`` and the
    storage, the seed, the tuning cases' ids and volumes). The same tuning gets the same name (a
    rerun resumes it); raising ``n_trials`` continues it."""
    from bonemet.search import study_digest

    settings = spec.model_dump(mode="json")
    settings["tune"] = {k: v for k, v in settings["tune"].items() if k not in ("n_trials", "storage")}
    chunks = []
    for items in (train_items, val_items):
        for item in items:
            chunks.append(str(item.get("case_id", "")).encode() + b"\0")
            for key in ("image", "label"):
                value = item[key]
                value = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
                chunks.append(np.ascontiguousarray(value).tobytes())
    return f"bonemet-segment-{spec.model}-{study_digest({'segment': settings, 'seed': int(seed)}, *chunks)}"


def tune(
    model_factory: Callable[[], Any],
    train_items: Sequence[Mapping[str, Any]],
    val_items: Sequence[Mapping[str, Any]],
    spec: PlannedSegmentSpec,
    *,
    seed: int,
    tracker: Tracker | None = None,
) -> dict[str, Any]:
    """Optuna over ``spec.tune.search_space`` (``segment.train`` keys) on one validation split.

    ``spec.tune.n_trials`` trials, each a nested run ``tune-trial-<n>`` with its params and
    curves; the objective is the best validation Dice. The study is made as the classifiers'
    (:func:`bonemet.search.make_study`): TPE seeded with ``seed`` (in memory, the same seed gives
    the same trials), a median pruner on the best validation Dice after each epoch (from the
    second epoch, once ``tune.pruner_startup_trials`` trials finished), and with
    ``tune.storage`` the study :func:`tuning_study_name` names in that database, resumed: its
    finished trials count towards ``n_trials``. Returns the best trial's ``segment.train`` values
    (empty when ``n_trials`` is 0).
    """
    if spec.tune.n_trials <= 0:
        return {}
    from bonemet.search import (
        finished_trials,
        is_pruned,
        make_study,
        optimize,
        raise_pruned,
        remaining_trials,
        should_prune,
        suggest,
    )

    tracker = tracker or NullTracker()
    settings = spec.tune
    name = (f"bonemet-segment-{spec.model}" if settings.storage is None
            else tuning_study_name(spec, train_items, val_items, seed))

    def objective(trial: Any) -> float:
        values = suggest(trial, settings.search_space)
        trial_spec = spec.updated({f"train.{k}": v for k, v in values.items()})
        pruned_at: list[int] = []

        def on_epoch(epoch: int, best_dice: float) -> bool:
            # step epoch - 1: the first epoch is the pruner's warm-up (n_warmup_steps 1), as the first fold
            if should_prune(trial, best_dice, epoch - 1):
                pruned_at.append(epoch)
                return True
            return False

        with tracker.run(f"tune-trial-{trial.number}", nested=True):
            tracker.log_params(values)
            result = train_model(model_factory(), train_items, val_items, trial_spec, seed=seed, tracker=tracker,
                                 on_epoch=on_epoch)
            tracker.log_metrics({"best_val_dice": result.best_val_dice})
            if pruned_at:
                tracker.log_metrics({"pruned_at_epoch": float(pruned_at[0])})
        if pruned_at:
            raise_pruned()
        return result.best_val_dice

    study = make_study(name, seed=seed, pruner_startup_trials=settings.pruner_startup_trials, storage=settings.storage)
    left = remaining_trials(study, settings.n_trials)
    if settings.storage is not None:
        log.info("tuning: study %s in the shared storage: %d trial(s) finished, %d to run", name,
                 len(finished_trials(study)), left)
    optimize(study, objective, left)
    finished = finished_trials(study)
    log.info("tuning: best validation Dice %.4f with %s after %d trials (%d pruned)", study.best_value,
             study.best_params, len(finished), sum(is_pruned(t) for t in finished))
    return dict(study.best_params)
