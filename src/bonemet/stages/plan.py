"""`bonemet plan`: the cohort's fingerprint and the plan of every ``auto`` setting (``plan.out``).

Runs after validation. Measures the cohort (spacings, image sizes, lesion sizes, HU percentiles in
the lesions and in the bone region, the voxel class balance) and plans the target spacing, the HU
window, the network crop and the batch size for the segment profile in use and its budgets
(``segment.plan``); an explicit params value wins and the plan records which value came from
where. The preprocess and segment stages read the plan. Logged to MLflow (experiment
``segment.experiment``, run ``plan``): the values and their sources as params, plan.json as an
artifact, the warning count as a metric.
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cohort-dir", default=None, help="cohort folder (default: params data.cohort_dir)")
    parser.add_argument("--out", default=None, help="plan JSON (default: params plan.out)")
    parser.add_argument("--profile", default=None, help="segment profile (default: params segment.profile)")
    parser.add_argument("--n-jobs", type=int, default=None, help="processes, -1 all cores (default: params plan.n_jobs)")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")


def run(args: argparse.Namespace) -> int:
    from bonemet.planning import PlanInputs, fingerprint_cohort, make_plan
    from bonemet.stages._common import cohort_input, mlflow_tracker, read_cases, specs_from
    from bonemet.tracking import NullTracker
    from bonemet.utils import write_json

    params = specs_from(args, segment_profile=args.profile)
    if args.n_jobs is not None:
        params = params.model_copy(update={"plan": params.plan.updated({"n_jobs": args.n_jobs})})
    out = args.out or params.plan.out
    cases = read_cases(params, args.cohort_dir)
    inputs = PlanInputs.from_params(params)
    fingerprint = fingerprint_cohort(
        cases, mask_label=params.data.mask_label, grid_tolerance_mm=params.validation.grid_tolerance_mm,
        crop=params.preprocess.crop, samples_per_case=params.plan.samples_per_case, n_jobs=params.plan.n_jobs,
        show_progress=not args.no_progress)
    plan = make_plan(fingerprint, inputs)
    for warning in plan["warnings"]:
        log.warning("plan: %s", warning)
    write_json(out, plan)
    for key, entry in plan["values"].items():
        log.info("plan: %s = %s (%s%s)", key, entry["value"], entry["source"],
                 "" if entry["source"] == "plan" else f"; the plan alone: {entry['planned']}")
    tracker = NullTracker() if args.no_tracking else mlflow_tracker(params, params.segment.experiment,
                                                                    inputs=[cohort_input(params)])
    with tracker.run("plan", tags={"stage": "plan", "profile": params.segment.profile}):
        tracker.log_params({**{f"{k}": v["value"] for k, v in plan["values"].items()},
                            **{f"source.{k}": v["source"] for k, v in plan["values"].items()}})
        tracker.log_metrics({"n_cases": plan["fingerprint"]["n_cases"], "n_warnings": len(plan["warnings"]),
                             "field_of_view_mm": plan["details"]["field_of_view_mm"]})
        tracker.log_dict(plan, "plan.json")
    log.info("wrote %s: %d cases, %d warning(s)", out, plan["fingerprint"]["n_cases"], len(plan["warnings"]))
    return 0
