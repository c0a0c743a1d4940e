"""`bonemet segment`: ten-fold training, out-of-fold automatic masks, metrics, the registered model.

One call of :func:`bonemet.segmentation.pipeline.run_segmentation` (``import_segmentation`` for
``segment.model: external``: masks made elsewhere, scored, nothing registered); the best fold's model
is registered as ``segment.model_name``, with ``segment.alias`` at ``segment.gate.min_dice``.
"""

from __future__ import annotations

import argparse
import logging
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
    from bonemet.planning.resolve import planned_params, read_plan
    from bonemet.registry.gate import decide_segmenter_promotion
    from bonemet.registry.registration import register_segmenter
    from bonemet.segmentation import pipeline
    from bonemet.segmentation.data import load_cases, load_volume
    from bonemet.splits import read_splits
    from bonemet.stages._common import cohort_input, mlflow_tracker, read_cases, specs_from
    from bonemet.tracking import NullTracker

    params = specs_from(args, segment_profile=args.profile)
    if args.model:
        params = params.model_copy(update={"segment": params.segment.updated({"model": args.model})})
    manifest, seg, external = read_cases(params), params.segment, params.segment.model == "external"
    plan = read_plan(params.plan.out) if Path(params.plan.out).is_file() else None
    tracker = NullTracker() if args.no_tracking else mlflow_tracker(params, seg.experiment, long_running=not external,
                                                                    inputs=[cohort_input(params)])
    tags = {"stage": "segment", "model": seg.model} | ({} if external else {"profile": seg.profile})
    common = {"mask_label": params.data.mask_label, "grid_tolerance_mm": params.validation.grid_tolerance_mm}
    with tracker.run("segment", tags=tags) as parent_id:
        if external:
            result = pipeline.import_segmentation(manifest, seg, cohort_dir=params.data.cohort_dir, plan=plan, tracker=tracker,
                                         **common)
        else:
            params = planned_params(params, plan)  # the plan applied, once: no `auto` past this line
            cases = load_cases(params.preprocess.out_dir, {c.case_id: c for c in manifest})
            splits = read_splits(params.split.out)
            result = pipeline.run_segmentation(
                cases, {k: int(v) for k, v in splits["all_folds"].items()}, params.segment, params.preprocess,
                seed=params.seed, figure_dpi=params.evaluate.figure_dpi, plan=plan, groups=splits.get("groups"),
                only_folds=[int(f) for f in args.folds.split(",")] if args.folds else None, tracker=tracker, **common)
        summary, model = result.summary, None if external else result.cv.best_model
        trained = result.spec.final_model != "none" and model is not None and not args.no_tracking
        if not external:  # the registry gate: the registered model gets the alias at this Dice only
            decision = decide_segmenter_promotion(summary.get("dice_mean"), min_dice=seg.gate.min_dice,
                                                  n_cases=len(result.case_table))
            register = trained and not args.no_register and not args.folds
            summary["gate"] = {"min_dice": seg.gate.min_dice, "promote": decision.promote,
                               "reason": decision.reason, "registered": register}
            tracker.set_tags({"gate_decision": "promote" if decision.promote else "hold",
                              "gate_reason": decision.reason})
        pipeline.write_outputs(result, params.evaluate.figure_dpi)
        tracker.log_table(result.case_table, "segmentation_cases.csv")
        if not external:
            tracker.log_artifact(Path(seg.plots_dir) / "curves.png", artifact_path="curves")
        tracker.log_dict(summary, "segmentation.json")
        if trained:
            register_segmenter(result, parent_id=parent_id, decision=decision, register=register, tracker=tracker,
                               example=pipeline.input_example(load_volume(cases[0], with_label=False), result.spec.roi_size))
    log.info("segment: mean Dice %.4f (sd %.4f) over %d cases in %.0f s", summary.get("dice_mean") or float("nan"),
             summary.get("dice_sd") or float("nan"), len(result.case_table), result.wall_seconds)
    return 0
