"""`bonemet segment`: ten-fold MISSU training, out-of-fold automatic masks, metrics, registered model.

Params: the ``segment`` section; ``segment.profile`` picks ``segment.profiles.<name>``, merged
over the common keys (``dvc exp run -S segment.profile=paper``). The final model is registered
as ``segment.model_name`` with a signature, an input example and its own code and requirements
(:func:`bonemet.registry.registration.log_segmenter`); it gets ``segment.alias`` only when the
out-of-fold mean Dice reaches ``segment.gate.min_dice`` (decision in ``metrics/segmentation.json``
and the MLflow tags ``gate_decision`` / ``gate_reason``). With ``segment.model: external``
nothing is trained: the masks in ``segment.external.masks_dir`` (made by nnU-Net,
TotalSegmentator...) are checked and written as the automatic masks, scored against the manual
masks like MISSU's, and nothing is registered.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default=None, help="params profile (default: params segment.profile)")
    parser.add_argument("--folds", default=None, help="comma-separated fold numbers to run (default: all); "
                        "a partial run writes masks only for those folds' cases: for debugging and timing")
    parser.add_argument("--model", default=None, help="network (default: params segment.model)")
    parser.add_argument("--no-register", action="store_true", help="do not register the final model")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow (and do not register)")


def run(args: argparse.Namespace) -> int:
    import json
    import os
    from collections import Counter

    import pandas as pd
    import torch

    from bonemet.planning.resolve import planned_params, read_plan
    from bonemet.registry.gate import decide_segmenter_promotion
    from bonemet.segmentation.cv import run_cross_validation
    from bonemet.segmentation.data import load_cases, load_volume
    from bonemet.segmentation.inference import InferenceSettings
    from bonemet.segmentation.metrics import summarize
    from bonemet.segmentation.networks import network_kwargs
    from bonemet.segmentation.training import resolve_device
    from bonemet.stages._common import cohort_input, mlflow_tracker, read_cases, run_tags, specs_from
    from bonemet.tracking import NullTracker

    params = specs_from(args, segment_profile=args.profile)
    if args.model:
        params = params.model_copy(update={"segment": params.segment.updated({"model": args.model})})
    manifest = read_cases(params)
    if params.segment.model == "external":
        return _run_external(args, params, params.segment, manifest)
    plan = read_plan(params.plan.out) if Path(params.plan.out).is_file() else None
    params = planned_params(params)  # the plan's values for every `auto` setting (explicit ones win)
    seg = params.segment
    name = seg.model
    num_threads = seg.num_threads or os.cpu_count() or 1
    torch.set_num_threads(num_threads)
    net_kwargs = network_kwargs(seg)

    cases = load_cases(seg.preprocessed_dir, {c.case_id: c for c in manifest})
    splits = json.loads(Path(seg.splits).read_text(encoding="utf-8"))
    folds = {k: int(v) for k, v in splits["all_folds"].items()}
    only_folds = [int(f) for f in args.folds.split(",")] if args.folds else None
    log.info("segment: %s, profile '%s', %d cases, %d folds, roi %s, %d threads, device %s", name, seg.profile,
             len(cases), len(set(folds.values())), seg.roi_size, num_threads, seg.device)

    tracker = NullTracker() if args.no_tracking else mlflow_tracker(params, seg.experiment, long_running=True,
                                                                    inputs=[cohort_input(params)])
    start = time.perf_counter()
    with tracker.run("segment", tags={"stage": "segment", "model": name, "profile": seg.profile}) as parent_id:
        tracker.log_params({
            "model": name, "profile": seg.profile, "network": net_kwargs, "seed": params.seed,
            "num_threads": num_threads, **seg.model_dump(mode="json", exclude={"networks", "profile", "model"}),
        })
        if plan is not None:  # which settings the plan chose and which params fixed
            tracker.log_params({f"plan_source.{k}": v["source"] for k, v in plan["values"].items()})
            tracker.log_dict(plan, "plan.json")
        if seg.tune.n_trials > 0:
            seg = _tune(seg, cases, folds, params.seed, tracker, load_volume)
        settings = InferenceSettings.from_params(params.preprocess, seg)
        result = run_cross_validation(
            cases, folds, seg, settings, seed=params.seed, mask_label=params.data.mask_label,
            grid_tolerance_mm=params.validation.grid_tolerance_mm, num_threads=num_threads,
            figure_dpi=params.evaluate.figure_dpi, tracker=tracker,
            fold_params={"model": name, "network": net_kwargs}, only_folds=only_folds,
            groups=splits.get("groups"),
        )
        wall = time.perf_counter() - start
        table = pd.DataFrame(result.case_rows).sort_values("case_id")
        summary = summarize(result.case_rows) if "dice" in table.columns else {"n_cases": len(table)}
        summary["bias"] = _bias(result.case_rows, cases, plan, seg.bias.max_dice_gap)
        # what was trained and how, never how long it took (wall times go to MLflow only): the same
        # code, data and params write the same bytes, on any machine and under any load
        summary.update({
            "model": name, "profile": seg.profile, "n_folds": len(result.folds), "best_fold": result.best_fold,
            "device": str(resolve_device(seg.device)), "num_threads": num_threads,
            "max_steps": seg.train.max_steps,
            "epochs_mean": sum(len(f.history) for f in result.folds) / max(1, len(result.folds)),
            "n_parameters": result.folds[0].n_parameters if result.folds else 0,
            # per fold: epochs, the epochs the schedule annealed over, steps, why training stopped
            "folds": [f.summary() for f in result.folds],
            "stop_reasons": dict(sorted(Counter(f.stop_reason for f in result.folds).items())),
        })
        tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, int | float) and v is not None})
        tracker.log_metrics({
            "wall_seconds": wall, "train_seconds_total": sum(f.train_seconds for f in result.folds),
            "infer_seconds_per_case": sum(f.infer_seconds_per_case * f.n_test for f in result.folds) / max(1, len(table)),
        })
        tracker.log_metrics({f"folds_stopped_{k}": v for k, v in summary["stop_reasons"].items()})
        tracker.log_metrics(_bias_metrics(summary["bias"]))
        decision = decide_segmenter_promotion(summary.get("dice_mean"), min_dice=seg.gate.min_dice, n_cases=len(table))
        register = (seg.final_model != "none" and result.best_model is not None and not args.no_tracking
                    and not args.no_register and not args.folds)
        summary["gate"] = {"min_dice": seg.gate.min_dice, "promote": decision.promote, "reason": decision.reason,
                           "registered": register}
        tracker.set_tags({"gate_decision": "promote" if decision.promote else "hold", "gate_reason": decision.reason})
        _write_outputs(seg, summary, table, result, params.evaluate.figure_dpi)
        tracker.log_table(table, "segmentation_cases.csv")
        tracker.log_artifact(Path(seg.plots_dir) / "curves.png", artifact_path="curves")
        tracker.log_dict(summary, "segmentation.json")
        if seg.final_model != "none" and result.best_model is not None and not args.no_tracking:
            _log_final_model(seg, name, net_kwargs, settings, result, tracker, parent_id, register=register,
                             decision=decision, example=input_example(load_volume(cases[0], with_label=False),
                                                                      seg.roi_size),
                             exp_tags=run_tags(params.data.cohort_dir))
    log.info("segment: mean Dice %.4f (sd %.4f) over %d cases in %.0f s", summary.get("dice_mean") or float("nan"),
             summary.get("dice_sd") or float("nan"), len(table), wall)
    return 0


def _run_external(args, params, seg, manifest) -> int:
    """``segment.model: external``: the external masks become the automatic masks; metrics, no model."""
    import pandas as pd

    from bonemet.planning.resolve import read_plan
    from bonemet.segmentation.external import import_external_masks, resolve_external_dir
    from bonemet.segmentation.metrics import summarize
    from bonemet.stages._common import cohort_input, mlflow_tracker
    from bonemet.tracking import NullTracker

    external_dir = resolve_external_dir(seg.external.masks_dir, params.data.cohort_dir)
    tracker = NullTracker() if args.no_tracking else mlflow_tracker(params, seg.experiment,
                                                                    inputs=[cohort_input(params)])
    start = time.perf_counter()
    with tracker.run("segment", tags={"stage": "segment", "model": "external"}):
        tracker.log_params({"model": "external", "external_masks_dir": str(external_dir),
                            "external_label": seg.external.label, "mask_label": params.data.mask_label,
                            "n_cases": len(manifest)})
        rows = import_external_masks(manifest, external_dir, seg.masks_dir, label=seg.external.label,
                                     mask_label=params.data.mask_label,
                                     grid_tolerance_mm=params.validation.grid_tolerance_mm)
        table = pd.DataFrame(rows).sort_values("case_id")
        summary = summarize(rows)
        summary.update({"model": "external", "external_masks_dir": str(external_dir), "n_folds": 0})
        plan = read_plan(params.plan.out) if Path(params.plan.out).is_file() else None
        summary["bias"] = _bias(rows, manifest, plan, seg.bias.max_dice_gap)
        tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, int | float) and v is not None})
        tracker.log_metrics(_bias_metrics(summary["bias"]))
        tracker.log_metrics({"wall_seconds": time.perf_counter() - start})
        _write_outputs(seg, summary, table, None, params.evaluate.figure_dpi)
        tracker.log_table(table, "segmentation_cases.csv")
        tracker.log_dict(summary, "segmentation.json")
    log.info("segment (external masks from %s): mean Dice %.4f (sd %.4f) over %d cases", external_dir,
             summary.get("dice_mean") or float("nan"), summary.get("dice_sd") or float("nan"), len(table))
    return 0


def _bias(case_rows, cases, plan, max_gap: float) -> dict:
    """Dice by label and by lesion density and size (the plan's fingerprint); a warning when the
    labels' mean Dice differ by more than ``segment.bias.max_dice_gap``."""
    from bonemet.segmentation.metrics import dice_by_group

    measured = {str(c["case_id"]): c for c in ((plan or {}).get("fingerprint") or {}).get("cases", [])}
    bias = dice_by_group(case_rows, {c.case_id: c.label for c in cases},
                         {k: v.get("lesion_hu_median") for k, v in measured.items()},
                         {k: v.get("lesion_volume_ml") for k, v in measured.items()})
    gap = bias["label_dice_gap"]
    bias["max_dice_gap"] = max_gap
    if gap is not None and abs(gap) > max_gap:
        log.warning("segment: mean Dice of label-1 lesions %.3f, of label-0 lesions %.3f: they differ by %.3f, more "
                    "than segment.bias.max_dice_gap %.2f; a classifier of automatic-mask features may learn the "
                    "segmenter's errors (Dice by lesion density in metrics/segmentation.json `bias`)",
                    bias["by_label"]["1"]["dice_mean"], bias["by_label"]["0"]["dice_mean"], abs(gap), max_gap)
    return bias


def _bias_metrics(bias: dict) -> dict[str, float]:
    """The bias summary as MLflow metrics (``dice_label_<k>``, ``label_dice_gap``, ``dice_density_q<k>``...)."""
    out = {f"dice_label_{k}": v["dice_mean"] for k, v in bias["by_label"].items()}
    if bias["label_dice_gap"] is not None:
        out["label_dice_gap"] = bias["label_dice_gap"]
    for key, name in (("by_density_quartile", "density"), ("by_size_quartile", "size")):
        out |= {f"dice_{name}_q{g['quartile']}": g["dice_mean"] for g in bias.get(key, [])}
    return out


def _tune(seg, cases, folds, seed, tracker, load_volume):
    """Optuna on the first fold's training cases (its validation split); returns the tuned spec."""
    from bonemet.segmentation.cv import split_validation
    from bonemet.segmentation.networks import network_from_spec
    from bonemet.segmentation.training import tune

    first = min(folds.values())
    train_all = [c for c in cases if folds[c.case_id] != first]
    train_ids, val_ids = split_validation([c.case_id for c in train_all], seg.val_fraction, seed + first)
    by_id = {c.case_id: c for c in train_all}
    train_items = [load_volume(by_id[i]) for i in train_ids]
    val_items = [load_volume(by_id[i]) for i in val_ids]
    best = tune(lambda: network_from_spec(seg), train_items, val_items, seg, seed=seed, tracker=tracker)
    tracker.log_params({f"tuned.{k}": v for k, v in best.items()})
    return seg.updated({f"train.{k}": v for k, v in best.items()})


def _write_outputs(seg, summary, table, result, dpi: int) -> None:
    """metrics JSON, per-case CSV, per-fold curve CSVs (DVC plots) and the curves PNG (no curves
    without a training ``result``: external masks)."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from bonemet.segmentation.cv import plot_curves
    from bonemet.utils import atomic_path, write_json

    write_json(seg.metrics, summary)
    with atomic_path(seg.cases_table) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(seg.plots_dir, is_dir=True) as tmp_dir:
        (tmp_dir / "curves").mkdir()
        if result is not None:
            for fold in result.folds:
                pd.DataFrame(fold.history).to_csv(tmp_dir / "curves" / f"fold-{fold.fold}.csv", index=False)
            fig = plot_curves({f.fold: f.history for f in result.folds},
                              title=f"{summary['model']}: loss and Dice per epoch")
            fig.savefig(tmp_dir / "curves.png", dpi=dpi)
            plt.close(fig)
        if "dice" in table.columns:
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.hist(table["dice"], bins=20, range=(0, 1))
            ax.set_xlabel("Dice (auto vs manual, original grid)" if result is None
                          else "out-of-fold Dice (auto vs manual, original grid)")
            ax.set_ylabel("cases")
            fig.tight_layout()
            fig.savefig(tmp_dir / "dice_histogram.png", dpi=dpi)
            plt.close(fig)


def input_example(item, roi_size):
    """A network input ``(1, 1, *roi_size)`` float32: the centre of a preprocessed case (zero-padded)."""
    import numpy as np

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


def _log_final_model(seg, name, net_kwargs, settings, result, tracker, parent_id, register: bool, decision,
                     example, exp_tags) -> None:
    """Log the best fold's model (by validation Dice), register it as ``model_name`` and give it
    ``alias`` when the gate's ``decision`` promotes it."""
    from bonemet.registry.registration import log_segmenter

    metadata = {
        "network": name, "network_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in net_kwargs.items()},
        **settings.to_metadata(), "source_fold": result.best_fold, "source_run_id": result.best_run_id or "",
    }
    tracker.log_dict(metadata, "model_metadata.json")
    log_segmenter(result.best_model.eval(), example, metadata, name="model")
    if not register or parent_id is None:
        return
    from bonemet.registry.store import register_model, set_alias

    version = register_model(
        parent_id, "model", seg.model_name,
        description=f"{name} segmentation model from fold {result.best_fold} (best validation Dice) of the "
                    f"ten-fold run; input: a CT preprocessed as in metadata['preprocess']. Gate: {decision.reason}.",
        tags={"network": name, "profile": seg.profile, "source_fold": str(result.best_fold),
              "gate_decision": "promote" if decision.promote else "hold", "gate_reason": decision.reason,
              **{k: v for k, v in exp_tags.items() if k == "dvc_exp"}},
    )
    if decision.promote:
        set_alias(seg.model_name, seg.alias, version)
    else:
        log.warning("%s version %s registered without the alias '%s': %s", seg.model_name, version, seg.alias,
                    decision.reason)
