"""Benchmark: where one training epoch of the segment stage's cpu profile spends its time, and what
cheaper arithmetic would buy (issue 23 §1).

Fold 0 of the default cohort (planned, preprocessed and split as the stages do, into a work
folder), the network, loader, loss and optimiser the segment stage builds (``segment`` params with
the profile merged in), and ``--epochs`` epochs timed phase by phase, as the training loop runs
them (:mod:`bonemet.segmentation.training`):

* ``data``: drawing the next batch from the loader (crop sampling and MONAI augmentation; in the
  training process when ``train.num_workers`` is 0);
* ``forward`` (network and loss), ``backward``, ``optimiser`` (clipping and the SGD step);
* ``validation``: the per-epoch validation (:func:`~bonemet.segmentation.training.evaluate`).

Then the levers the profile points at, side by side on the same batches and machine, each epoch
of each interleaved with the others (so load falls on all alike): ``fp32`` (the training step as
the segment stage runs it: the baseline of ``x_fp32``), ``bf16`` (CPU autocast to bfloat16, reported with whether
the CPU has native bf16: the ``avx512_bf16`` / ``amx_bf16`` flags), ``compiled`` (``--compile``:
``torch.compile``, with its compile time), and the validation variants (``val_mode`` crops, the
window overlap, validating every 5th epoch). Optimiser steps per second for a lever are the epoch's steps over its wall time
with that lever. No Dice is measured here: a lever that changes the arithmetic must then be run
through the ten folds (benchmarks/segmentation.py) before it becomes a default.

    # the lead's run (alone on the machine): 3 epochs of fold 0, 2 threads
    python benchmarks/segmentation_profile.py --epochs 3 --threads 2 --json benchmarks/results/segmentation_profile.json
    # the quick mode CI runs: 16 small cases, one epoch, tiny crops
    python benchmarks/segmentation_profile.py --quick --json /tmp/segmentation_profile.json
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
_spec = importlib.util.spec_from_file_location("benchmarks_common", _HERE / "_common.py")
common = sys.modules["benchmarks_common"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

log = logging.getLogger("benchmarks.segmentation_profile")

QUICK_CASES, QUICK_POSITIVE = 16, 7
QUICK_PREPROCESS = {"target_spacing_mm": [2.5, 2.5, 2.5], "crop.min_size_vox": [16, 16, 16]}
QUICK_SEGMENT = {"roi_size": [16, 16, 16], "train.val_mode": "crops", "inference.overlap": 0.25,
                 "train.batch_size": 2}


def _fold_items(prepared: Any, spec: Any, seed: int) -> tuple[list, list]:
    """Fold 0's training and early-stopping items, split as the cross-validation driver splits them."""
    from bonemet.segmentation.cv import split_validation
    from bonemet.segmentation.data import load_volume

    by_id = {c.case_id: c for c in prepared.cases}
    fold = min(prepared.folds.values())
    train_all = sorted(cid for cid, f in prepared.folds.items() if f != fold and cid in by_id)
    train_ids, val_ids = split_validation(train_all, spec.val_fraction, seed + fold, prepared.groups)
    return [load_volume(by_id[c]) for c in train_ids], [load_volume(by_id[c]) for c in val_ids]


def _timed_epoch(step: Any, loader: Any, *, bf16: bool = False, model: Any = None) -> dict[str, float]:
    """One pass over ``loader`` with ``step``'s model (or ``model``: e.g. compiled), loss and
    optimiser, timed phase by phase (the loader's batches are plain tensors: its transforms end in
    ``EnsureTyped(track_meta=False)``)."""
    import torch

    from bonemet.segmentation.training import split_output

    times: dict[str, float] = defaultdict(float)
    steps = 0
    model, optimizer = (step.model if model is None else model), step.optimizer
    model.train()
    iterator = iter(loader)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            break
        t1 = time.perf_counter()
        x = batch["image"].contiguous(memory_format=step.memory_format)
        y = batch["label"]
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, distill = split_output(model(x))
            loss = step.loss_fn(logits.float(), y)
            if distill is not None and step.distill_weight:
                loss = loss + step.distill_weight * distill.float()
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        if step.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), step.grad_clip)
        optimizer.step()
        t4 = time.perf_counter()
        times["data"] += t1 - t0
        times["forward"] += t2 - t1
        times["backward"] += t3 - t2
        times["optimiser"] += t4 - t3
        steps += 1
    times["steps"] = steps
    return dict(times)


def _validation_seconds(model: Any, val_items: list, spec: Any, step: Any) -> float:
    from bonemet.segmentation.training import evaluate

    start = time.perf_counter()
    evaluate(model, val_items, spec, step.loss_fn, step.device)
    return time.perf_counter() - start


def _profile(spec: Any, train_items: list, val_items: list, *, seed: int, epochs: int,
             compile_model: bool) -> dict[str, Any]:
    """The phase split over ``epochs`` epochs (fp32, as trained), then the levers."""
    import torch

    from bonemet.segmentation import training
    from bonemet.segmentation.networks import network_from_spec, seed_everything

    seed_everything(seed)
    memory_format = torch.channels_last_3d if spec.train.channels_last else torch.contiguous_format
    model = network_from_spec(spec).to(memory_format=memory_format)
    loader = training._training_loader(train_items, spec, seed)
    optimizer, _ = training._optimizer(model, spec.train, max(1, epochs))
    step = training._Step(model, optimizer, training.make_loss(spec.train), torch.device("cpu"), memory_format,
                          spec.distill_weight, spec.train.grad_clip, False)
    variants: dict[str, dict[str, Any]] = {"bf16": {"bf16": True}}
    compile_s = None
    if compile_model:  # inductor: its compile time is paid once per fold (per process)
        start = time.perf_counter()
        compiled = torch.compile(model)
        training._seed_epoch(loader, seed, 0)
        _timed_epoch(step, loader, model=compiled)
        compile_s = time.perf_counter() - start
        variants["compiled"] = {"model": compiled}
    for options in ({}, *variants.values()):  # one untimed epoch each: oneDNN builds its kernels on first use
        training._seed_epoch(loader, seed, 0)
        _timed_epoch(step, loader, **options)
    epochs_out, variant_out = [], {name: [] for name in variants}
    for epoch in range(1, epochs + 1):  # the variants' epochs interleaved: the same load on each
        training._seed_epoch(loader, seed, epoch)
        phases = _timed_epoch(step, loader)
        phases["validation"] = _validation_seconds(model, val_items, spec, step)
        epochs_out.append(phases)
        for name, options in variants.items():
            training._seed_epoch(loader, seed, epoch)
            variant_out[name].append(_timed_epoch(step, loader, **options))
    keys = ("data", "forward", "backward", "optimiser", "validation")
    mean = {k: sum(e[k] for e in epochs_out) / len(epochs_out) for k in keys}
    total = sum(mean.values())
    steps = epochs_out[0]["steps"]
    levers: dict[str, Any] = {"fp32": {"epoch_s": total, "steps_per_s": steps / total}}
    for name, runs in variant_out.items():
        phases = {k: sum(e[k] for e in runs) / len(runs) for k in keys[:4]}
        epoch_s = sum(phases.values()) + mean["validation"]
        levers[name] = {"epoch_s": epoch_s, "steps_per_s": steps / epoch_s, **{f"{k}_s": v for k, v in phases.items()}}
    if compile_s is not None:
        levers["compiled"]["compile_s"] = compile_s
    cheaper = {"val_crops": {"train.val_mode": "crops"}}
    if spec.train.val_overlap != 0.0:  # the cpu profile already validates at overlap 0
        cheaper["val_overlap_0"] = {"train.val_overlap": 0.0}
    for name, change in cheaper.items():
        varied = spec.updated(change)
        seconds = _validation_seconds(model, val_items, varied, step)
        epoch_s = total - mean["validation"] + seconds
        levers[name] = {"validation_s": seconds, "epoch_s": epoch_s, "steps_per_s": steps / epoch_s}
    no_val = total - mean["validation"]
    levers["validation_every_5_epochs"] = {"epoch_s": no_val + mean["validation"] / 5,
                                           "steps_per_s": steps / (no_val + mean["validation"] / 5)}
    base = levers["fp32"]["steps_per_s"]
    for lever in levers.values():
        lever["x_fp32"] = lever["steps_per_s"] / base
    return {"steps_per_epoch": steps, "epochs": len(epochs_out),
            "phases_s": {k: round(v, 4) for k, v in mean.items()},
            "phases_share": {k: round(v / total, 4) for k, v in mean.items()},
            "levers": {k: {kk: round(vv, 4) for kk, vv in v.items()} for k, v in levers.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--epochs", type=int, default=3, help="epochs to time (their mean is reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the developers' machine: 2)")
    parser.add_argument("--cohort-dir", type=Path, default=None, help="cohort (default: params data.cohort_dir)")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes of compiling)")
    parser.add_argument("--quick", action="store_true", help="16 small cases, one epoch, tiny crops (CI runs this)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from bonemet.config import load_specs, planned_spec

    torch.set_num_threads(args.threads)
    params = load_specs(args.params)
    if args.quick:
        args.epochs = 1
        params = params.model_copy(update={"preprocess": params.preprocess.updated(QUICK_PREPROCESS),
                                           "split": params.split.updated({"n_folds": 3})})
    synthetic = params.data.synthetic
    with tempfile.TemporaryDirectory(prefix="bonemet-segmentation-profile-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        prepared = common.prepare_cohort(
            work, params, cohort_dir=None if args.quick else (args.cohort_dir or Path(params.data.cohort_dir)),
            n_cases=QUICK_CASES if args.quick else 0, n_positive=QUICK_POSITIVE if args.quick else synthetic.n_positive,
            size="small" if args.quick else synthetic.size, n_jobs=1 if args.quick else params.preprocess.n_jobs)
        spec = planned_spec(prepared.params.segment.updated(QUICK_SEGMENT if args.quick else {}), "the profile")
        train_items, val_items = _fold_items(prepared, spec, prepared.params.seed)
        result = _profile(spec, train_items, val_items, seed=prepared.params.seed, epochs=args.epochs,
                          compile_model=args.compile)
    flags = common.cpu_model_and_flags().get("cpu_flags", "").split()
    report = {
        "machine": common.machine(), "commit": common.commit(), "quick": args.quick, "threads": args.threads,
        "native_bf16": sorted(f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile")),
        "setup": {"profile": spec.profile, "model": spec.model, "roi_size": list(spec.roi_size),
                  "batch_size": spec.train.batch_size, "num_samples": spec.train.num_samples,
                  "num_workers": spec.train.num_workers, "val_mode": spec.train.val_mode,
                  "n_train": len(train_items), "n_val": len(val_items)},
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        **result,
    }
    report["machine"].pop("cpu_flags", None)
    common.print_json(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
