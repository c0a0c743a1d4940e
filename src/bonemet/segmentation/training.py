"""Training loop for the segmentation networks (MISSU and the MONAI baselines).

SGD with momentum, a poly or cosine learning-rate schedule, MONAI ``DiceCELoss`` plus MISSU's
self-distillation term (weight ``distill_weight``; networks that return plain logits add
nothing), seeded MONAI augmentation, early stopping on the validation loss and the best
checkpoint chosen by validation Dice. Runs on CPU by default and on CUDA when present, with
bf16/fp16 autocast there.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bonemet.segmentation.inference import autocast_context, check_mirror_axes, sliding_window_logits
from bonemet.segmentation.metrics import dice as dice_score
from bonemet.tracking.base import NullTracker, Tracker
from bonemet.utils import seed_everything

log = logging.getLogger(__name__)


class TrainingConfigError(ValueError):
    """A training setting is out of range."""


@dataclass
class TrainConfig:
    """Every tunable of one training run (the stage fills it from ``params.yaml``).

    Units: learning rates per step; ``rotate_range_deg`` in degrees; intensity shift in
    normalised intensity units (images are in [0, 1]); ``roi_size`` in voxels (D, H, W) at the
    preprocessing spacing.
    """

    roi_size: tuple[int, int, int] = (48, 48, 48)
    max_epochs: int = 50
    batch_size: int = 2
    num_samples: int = 2           # random crops per volume per epoch
    lr: float = 1e-3
    momentum: float = 0.99
    nesterov: bool = True
    weight_decay: float = 3e-5
    lr_schedule: str = "poly"      # poly | cosine | constant
    poly_power: float = 0.9
    lambda_dice: float = 1.0
    lambda_ce: float = 1.0
    distill_weight: float = 0.1
    patience: int = 10             # epochs without a lower validation loss before stopping
    min_delta: float = 0.0
    min_epochs: int = 1            # never stop before this many epochs
    pos: float = 1.0
    neg: float = 1.0
    flip_prob: float = 0.5
    rotate_prob: float = 0.2
    rotate_range_deg: float = 10.0
    intensity_prob: float = 0.5
    intensity_shift: float = 0.05
    intensity_scale: float = 0.1
    overlap: float = 0.25
    sw_batch_size: int = 4
    mirror_axes: tuple[int, ...] = ()  # test-time mirroring of the out-of-fold inference (0 = D, 1 = H, 2 = W)
    val_mode: str = "full"         # full: sliding window over whole volumes | crops: one lesion-centred roi crop per case
    val_overlap: float | None = None  # sliding-window overlap of the per-epoch validation (None: ``overlap``)
    grad_clip: float | None = 12.0
    device: str = "auto"           # auto | cpu | cuda
    amp: bool = True               # autocast on CUDA only
    num_threads: int | None = None
    num_workers: int = 0           # augmentation worker processes (0 = in the training process)
    channels_last: bool = True     # channels-last 3D memory format for training (~7% faster steps on CPU)
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.roi_size = tuple(int(r) for r in self.roi_size)  # type: ignore[assignment]
        try:
            self.mirror_axes = check_mirror_axes(self.mirror_axes)
        except ValueError as exc:
            raise TrainingConfigError(str(exc)) from exc
        if len(self.roi_size) != 3 or min(self.roi_size) < 1:
            raise TrainingConfigError(f"roi_size must be three positive ints (D, H, W); found {self.roi_size}")
        if self.lr <= 0:
            raise TrainingConfigError(f"lr must be > 0; found {self.lr}")
        if self.max_epochs < 1 or self.batch_size < 1 or self.num_samples < 1:
            raise TrainingConfigError(
                f"max_epochs, batch_size and num_samples must be >= 1; found "
                f"{self.max_epochs}, {self.batch_size}, {self.num_samples}"
            )
        if self.lr_schedule not in {"poly", "cosine", "constant"}:
            raise TrainingConfigError(f"lr_schedule must be poly, cosine or constant; found '{self.lr_schedule}'")
        if self.patience < 1:
            raise TrainingConfigError(f"patience must be >= 1; found {self.patience}")
        if self.num_workers < 0:
            raise TrainingConfigError(f"num_workers must be >= 0; found {self.num_workers}")
        if self.val_mode not in {"full", "crops"}:
            raise TrainingConfigError(f"val_mode must be full or crops; found '{self.val_mode}'")
        if not 0.0 <= self.overlap < 1.0:
            raise TrainingConfigError(f"overlap must be in [0, 1); found {self.overlap}")
        if self.val_overlap is not None and not 0.0 <= self.val_overlap < 1.0:
            raise TrainingConfigError(f"val_overlap must be in [0, 1) or null; found {self.val_overlap}")

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> TrainConfig:
        """Build from a flat mapping, ignoring keys this config does not know."""
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in params.items() if k in known})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class EarlyStopping:
    """Stop when the monitored value (lower is better) has not improved for ``patience`` steps."""

    def __init__(self, patience: int, min_delta: float = 0.0) -> None:
        if patience < 1:
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
        return self.bad_steps >= self.patience


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


def resolve_device(name: str = "auto"):
    """``torch.device`` for 'auto' (CUDA when available), 'cpu' or 'cuda'."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def count_parameters(model: Any) -> int:
    """Number of trainable parameters."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


def split_output(output: Any) -> tuple[Any, Any]:
    """``(logits, distillation_loss or None)`` from a network output (tensor or tuple)."""
    if isinstance(output, tuple | list):
        return output[0], (output[1] if len(output) > 1 else None)
    return output, None


def _lr_lambda(schedule: str, max_epochs: int, power: float) -> Callable[[int], float]:
    if schedule == "poly":
        return lambda epoch: max(0.0, 1.0 - epoch / max_epochs) ** power
    if schedule == "cosine":
        return lambda epoch: 0.5 * (1.0 + math.cos(math.pi * min(epoch, max_epochs) / max_epochs))
    return lambda epoch: 1.0


def make_loss(config: TrainConfig):
    """MONAI DiceCELoss on softmax outputs against integer labels (B, 1, D, H, W)."""
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=config.lambda_dice, lambda_ce=config.lambda_ce)


def evaluate(model: Any, items: Sequence[Mapping[str, Any]], config: TrainConfig, loss_fn: Any, device: Any) -> tuple[float, float]:
    """Mean validation loss and mean Dice per case.

    ``config.val_mode`` "full": sliding-window inference over whole volumes (what the
    out-of-fold prediction does); "crops": one lesion-centred ``roi_size`` crop per case (a
    cheap proxy for CPU budgets). The windows overlap by ``config.val_overlap`` (``overlap``
    when None): 0 makes full validation about 3x cheaper on a CPU.
    """
    import torch

    from bonemet.segmentation.data import lesion_centred_crop

    losses, dices = [], []
    for item in items:
        if config.val_mode == "crops":
            item = lesion_centred_crop(item, config.roi_size)
        overlap = config.overlap if config.val_overlap is None else config.val_overlap
        logits = sliding_window_logits(
            model, item["image"], config.roi_size, overlap, config.sw_batch_size, device
        )
        label = torch.as_tensor(item["label"])[None].to(device)
        with torch.no_grad():
            losses.append(float(loss_fn(logits, label)))
        pred = logits.argmax(dim=1)[0].cpu().numpy()
        dices.append(dice_score(pred, item["label"][0] > 0.5))
    return float(np.mean(losses)), float(np.mean(dices))


def train_model(
    model: Any,
    train_items: Sequence[Mapping[str, Any]],
    val_items: Sequence[Mapping[str, Any]],
    config: TrainConfig,
    tracker: Tracker | None = None,
    checkpoint_path: str | Path | None = None,
    validate: Callable[[Any, int], tuple[float, float]] | None = None,
    show_progress: bool = False,
) -> TrainResult:
    """Train ``model`` on in-memory volumes; validate each epoch; keep the best-Dice weights.

    Args:
        model: a torch module returning logits, or ``(logits, distillation_loss)`` in training mode.
        train_items, val_items: dicts ``{"image": (1,D,H,W), "label": (1,D,H,W), "case_id"}``
            (see :func:`bonemet.segmentation.data.load_volume`).
        config: the training settings.
        tracker: receives ``train_loss``, ``val_loss``, ``val_dice``, ``lr`` at ``step=epoch``
            (inside whatever run the caller opened).
        checkpoint_path: where the best checkpoint (state dict, epoch, val Dice, config) is saved.
        validate: optional ``(model, epoch) -> (val_loss, val_dice)`` replacing the default
            sliding-window validation (used by tests to script a loss sequence).

    Early stopping watches the validation loss (``patience`` epochs without improvement);
    the returned model carries the weights of the epoch with the best validation Dice.
    """
    import torch
    from monai.data import DataLoader, Dataset

    from bonemet.segmentation.data import train_transforms, with_crop_indices

    tracker = tracker or NullTracker()
    if not train_items:
        raise TrainingConfigError("no training cases")
    if config.num_threads:
        torch.set_num_threads(int(config.num_threads))
    seed_everything(config.seed)
    device = resolve_device(config.device)
    model = model.to(device)
    memory_format = torch.channels_last_3d if config.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)

    transform = train_transforms(
        config.roi_size, config.pos, config.neg, config.num_samples, config.flip_prob, config.rotate_prob,
        config.rotate_range_deg, config.intensity_prob, config.intensity_shift, config.intensity_scale,
        seed=config.seed, indexed=True,
    )
    dataset = Dataset([with_crop_indices(it, config.roi_size) for it in train_items], transform=transform)
    generator = torch.Generator().manual_seed(config.seed)
    # Workers (persistent: started once, not per epoch) augment the next crops while the network
    # trains on these; MONAI's DataLoader seeds each worker from ``generator``, so a run is
    # reproducible for a given num_workers.
    loader = DataLoader(
        dataset, batch_size=config.batch_size, shuffle=True, num_workers=config.num_workers, generator=generator,
        persistent_workers=config.num_workers > 0,
    )

    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, nesterov=config.nesterov and config.momentum > 0,
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(config.lr_schedule, config.max_epochs, config.poly_power)
    )
    loss_fn = make_loss(config)
    use_scaler = device.type == "cuda" and config.amp and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    amp_ctx = (lambda: autocast_context(device)) if config.amp else (lambda: autocast_context("cpu"))

    stopper = EarlyStopping(config.patience, config.min_delta)
    history: list[dict[str, float]] = []
    best_dice, best_epoch, best_state = -math.inf, 0, None
    stopped_early = False
    start = time.perf_counter()
    for epoch in range(1, config.max_epochs + 1):
        model.train()
        batch_losses = []
        for batch in loader:
            x = batch["image"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
            y = batch["label"].to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with amp_ctx():
                logits, distill = split_output(model(x))
                loss = loss_fn(logits.float(), y)
                if distill is not None and config.distill_weight:
                    loss = loss + config.distill_weight * distill.float()
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            batch_losses.append(float(loss.detach()))
        lr_now = optimizer.param_groups[0]["lr"]
        scheduler.step()
        if validate is not None:
            val_loss, val_dice = validate(model, epoch)
        else:
            val_loss, val_dice = evaluate(model, val_items, config, loss_fn, device)
        record = {
            "epoch": epoch, "train_loss": float(np.mean(batch_losses)), "val_loss": float(val_loss),
            "val_dice": float(val_dice), "lr": float(lr_now),
        }
        history.append(record)
        tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch)
        if show_progress or epoch == 1 or epoch % 10 == 0:
            log.info(
                "epoch %d: train loss %.4f, val loss %.4f, val Dice %.4f", epoch, record["train_loss"],
                val_loss, val_dice,
            )
        if val_dice > best_dice:
            best_dice, best_epoch = float(val_dice), epoch
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            if checkpoint_path is not None:
                torch.save(
                    {"state_dict": best_state, "epoch": epoch, "val_dice": best_dice, "config": config.as_dict()},
                    checkpoint_path,
                )
        if stopper.step(float(val_loss)) and epoch >= config.min_epochs:
            stopped_early = epoch < config.max_epochs
            log.info("early stopping at epoch %d (no lower validation loss for %d epochs)", epoch, config.patience)
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return TrainResult(
        model=model, history=history, best_epoch=best_epoch, best_val_dice=best_dice,
        stopped_early=stopped_early, train_seconds=time.perf_counter() - start, device=str(device),
    )


def tune(
    model_factory: Callable[[], Any],
    train_items: Sequence[Mapping[str, Any]],
    val_items: Sequence[Mapping[str, Any]],
    config: TrainConfig,
    n_trials: int,
    search_space: Mapping[str, Any],
    tracker: Tracker | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Optuna search of lr, batch size and epochs on one validation split (best validation Dice).

    ``search_space``: ``{"lr": [low, high]`` (log-uniform), ``"batch_size": [choices]``,
    ``"max_epochs": [choices]}``. Each trial is a nested run ``tune-trial-<n>`` with its params
    and curves. Returns the best trial's values (empty when ``n_trials`` is 0).
    """
    if n_trials <= 0:
        return {}
    import optuna

    tracker = tracker or NullTracker()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(trial: Any) -> float:
        values: dict[str, Any] = {}
        if "lr" in search_space:
            low, high = search_space["lr"]
            values["lr"] = trial.suggest_float("lr", float(low), float(high), log=True)
        if "batch_size" in search_space:
            values["batch_size"] = trial.suggest_categorical("batch_size", list(search_space["batch_size"]))
        if "max_epochs" in search_space:
            values["max_epochs"] = trial.suggest_categorical("max_epochs", list(search_space["max_epochs"]))
        trial_config = replace(config, **values)
        with tracker.run(f"tune-trial-{trial.number}", nested=True):
            tracker.log_params(values)
            result = train_model(model_factory(), train_items, val_items, trial_config, tracker)
            tracker.log_metrics({"best_val_dice": result.best_val_dice})
        return result.best_val_dice

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=n_trials)
    log.info("tuning: best validation Dice %.4f with %s", study.best_value, study.best_params)
    return dict(study.best_params)
