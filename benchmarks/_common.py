"""Shared by the benchmark scripts (not a benchmark): load a sibling script, describe the machine,
prepare a preprocessed, split cohort, print and write results.

Every script drops ``benchmarks/`` from ``sys.path`` (``benchmarks/radiomics.py`` would shadow
PyRadiomics) and loads this file with :func:`load_sibling`'s three lines.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def load_sibling(name: str) -> Any:
    """The module ``benchmarks/<name>.py``, loaded once by file under its own name (the folder is not
    on ``sys.path``; a sibling that imports another by name finds it in ``sys.modules``)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def print_json(result: Any, path: str | Path | None) -> None:
    """The one JSON printer of the benchmarks (``cohort_variation.print_json``)."""
    load_sibling("latent_recovery")  # cohort_variation imports it by name
    load_sibling("cohort_variation").print_json(result, str(path) if path else None)


def machine() -> dict[str, Any]:
    """Where a measurement ran: CPU, cores, load, versions (and the GPU when torch sees one)."""
    info: dict[str, Any] = {
        "platform": platform.platform(), "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2), **cpu_model_and_flags(),
    }
    if "torch" in sys.modules:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


def cpu_model_and_flags() -> dict[str, str]:
    """``cpu_model`` and ``cpu_flags`` as lscpu prints them (from /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return {"cpu_model": fields.get("model name", ""), "cpu_flags": fields.get("flags", "")}


def commit() -> str:
    """The repository's commit (with ``+dirty`` when the working tree differs), or ``unknown``."""
    try:
        head = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(HERE.parent), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


#: The planned settings' values the speed benchmarks (networks, inference, predict) were measured
#: with, where params leave them ``auto``: what the plan stage gives the default cohort on the cpu
#: profile (1.51 mm, 32^3 crops, batch 2), the HU window they were tuned with.
REFERENCE_PLAN = {
    "preprocess.target_spacing_mm": [1.5, 1.5, 1.5],
    "preprocess.hu_window": [-200.0, 1800.0],
    "segment.roi_size": [32, 32, 32],
    "preprocess.crop.min_size_vox": [32, 32, 32],
    "segment.train.batch_size": 2,
    # what the cpu profile's train_megavoxels (170) gives at batch 2 of one 32^3 crop
    "segment.train.max_steps": 2594,
}


def with_reference_plan(params: Any) -> Any:
    """``params`` with :data:`REFERENCE_PLAN` for every planned setting still ``auto``."""
    from bonemet.config import AUTO, setting
    from bonemet.planning import apply_values

    return apply_values(params, {k: v for k, v in REFERENCE_PLAN.items() if setting(params, k) == AUTO})


def plan_cohort(params: Any, cohort_dir: Path, n_jobs: int) -> tuple[Any, dict[str, Any]]:
    """The plan stage's work on ``cohort_dir``: ``(params with every auto setting planned, the plan)``."""
    from bonemet.data.manifest import read_manifest
    from bonemet.planning import PlanInputs, fingerprint_cohort, make_plan, resolve_params

    data = params.data
    cases = read_manifest(cohort_dir, roi=data.roi, seg_segment=data.segment)
    fingerprint = fingerprint_cohort(cases, mask_label=data.mask_label, grid_tolerance_mm=params.validation.grid_tolerance_mm,
                                     crop=params.preprocess.crop, samples_per_case=params.plan.samples_per_case,
                                     n_jobs=n_jobs)
    plan = make_plan(fingerprint, PlanInputs.from_params(params))
    return resolve_params(params, plan), plan


@dataclass
class PreparedCohort:
    """A cohort planned, preprocessed and split as the pipeline does it, in a work folder."""

    cohort_dir: Path
    manifest: list  # bonemet.data.manifest.Case
    cases: list  # bonemet.segmentation.data.SegCase
    folds: dict[str, int]
    groups: dict[str, str] | None
    #: the params with the plan's values for every ``auto`` setting (explicit ones kept)
    params: Any = None
    #: the plan (None when params left nothing ``auto``)
    plan: dict[str, Any] | None = None


def prepare_cohort(work: Path, params: Any, *, cohort_dir: Path | None, n_cases: int, n_positive: int,
                   size: str, n_jobs: int, protocols: list | None = None) -> PreparedCohort:
    """Plan ``cohort_dir`` (or a synthetic cohort of ``n_cases`` written into ``work/raw``, scanned
    with ``protocols``) when params leave settings ``auto``, preprocess it with the planned
    ``params.preprocess`` into ``work/preprocessed``, and split it with ``params.split`` and the
    seed as the split stage does (``all_folds``: the segmentation folds)."""
    from bonemet.config import unplanned_keys
    from bonemet.data.manifest import read_manifest
    from bonemet.data.synthetic import generate_cohort
    from bonemet.preprocessing import preprocess_cohort
    from bonemet.segmentation.data import load_cases
    from bonemet.splits import make_splits

    data = params.data
    if cohort_dir is None:
        cohort_dir = work / "raw"
        if not (cohort_dir / "manifest.csv").is_file():
            generate_cohort(cohort_dir, n_cases=n_cases, n_positive=n_positive, seed=data.synthetic.seed, size=size,
                            mask_label=data.mask_label, protocols=protocols, overwrite=True, show_progress=False)
    plan = None
    if unplanned_keys(params.preprocess, "preprocess") or unplanned_keys(params.segment, "segment"):
        params, plan = plan_cohort(params, cohort_dir, n_jobs)
    manifest = read_manifest(cohort_dir, roi=data.roi, seg_segment=data.segment)
    out = work / "preprocessed"
    if not (out / "cases.csv").is_file():
        preprocess_cohort(cohort_dir, params.preprocess.updated({"out_dir": str(out), "n_jobs": n_jobs}),
                          compute=params.compute, mask_label=data.mask_label,
                          grid_tolerance_mm=params.validation.grid_tolerance_mm,
                          roi=data.roi, seg_segment=data.segment, pseudonym_key=None, show_progress=False)
    cases = load_cases(out, {c.case_id: c for c in manifest})
    grouped = any(c.patient_id is not None for c in manifest)
    splits = make_splits([c.case_id for c in manifest], [c.label for c in manifest], test_size=params.split.test_size,
                         n_folds=params.split.n_folds, seed=params.seed,
                         groups=[c.patient for c in manifest] if grouped else None)
    folds = {k: int(v) for k, v in splits["all_folds"].items()}
    return PreparedCohort(cohort_dir, manifest, cases, folds, splits.get("groups"), params, plan)
