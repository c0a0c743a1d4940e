"""Radiomics extraction benchmark: ours (processes + per-case cache) vs plain sequential PyRadiomics.

Measures, on one synthetic cohort generated here (bonemet.data.synthetic, size "full"):
  1. whole-cohort rate (cases per minute) of plain PyRadiomics (``RadiomicsFeatureExtractor.execute``
     in a loop, one process) and of ``extract_cohort`` with ``n_jobs`` workers and an empty cache,
     in the same run, and their ratio;
  2. the time to extract after adding one case (cache warm for the others), as a fraction of the
     full run;
  3. peak resident memory per worker (max ``ru_maxrss`` over workers) and of the plain loop;
  4. the per-case time of a full-size case with the default settings (1316 features).

Settings come from params.yaml (radiomics section) + config/radiomics.yaml, as in the stage.

    # the lead's run (alone on the machine, about 3 min):
    python benchmarks/radiomics.py --n-cases 24 --n-jobs 2 --json benchmarks/results/radiomics.json
    # the quick mode CI runs: 3 small cases, two cheap feature classes (seconds)
    python benchmarks/radiomics.py --quick --json /tmp/radiomics_quick.json
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

# This file is called radiomics.py: drop its folder from the import path so that `radiomics`
# means PyRadiomics, not this script.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
_spec = importlib.util.spec_from_file_location("benchmarks_common", _HERE / "_common.py")
common = sys.modules["benchmarks_common"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

log = logging.getLogger("benchmarks.radiomics")

QUICK_CASES = 3
QUICK_SETTINGS = {"imageType": {"Original": {}}, "featureClass": {"firstorder": None, "shape": None},
                  "setting": {"binWidth": 25, "resampledPixelSpacing": None, "geometryTolerance": 1e-4}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cases", type=int, default=24, help="cases in the full run (one more is added)")
    parser.add_argument("--n-jobs", type=int, default=2, help="worker processes for ours")
    parser.add_argument("--seed", type=int, default=20240638)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--quick", action="store_true", help="3 small cases, cheap features (CI runs this)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("radiomics").setLevel(logging.ERROR)

    from bonemet.config import load_specs
    from bonemet.data.manifest import read_manifest
    from bonemet.data.synthetic import generate_cohort
    from bonemet.radiomics import (
        CaseInput,
        CohortStats,
        extract_cohort,
        plain_pyradiomics,
        settings_from_params,
    )

    params = load_specs(args.params)
    label = params.data.mask_label
    if args.quick:
        args.n_cases, args.n_jobs = QUICK_CASES, 1
        settings = {**QUICK_SETTINGS, "setting": {**QUICK_SETTINGS["setting"], "label": label}}
    else:
        settings = settings_from_params(params)
    tolerance = params.validation.grid_tolerance_mm
    n = args.n_cases
    with tempfile.TemporaryDirectory(prefix="bonemet-radiomics-bench-") as tmp:
        tmp = Path(tmp)
        generate_cohort(tmp / "raw", n_cases=n + 1, n_positive=(n + 1) // 2, seed=args.seed,
                        size="small" if args.quick else "full", mask_label=label, show_progress=False)
        cases = [CaseInput(c.case_id, c.label, c.image, c.manual_mask) for c in read_manifest(tmp / "raw")]
        first, added = cases[:n], cases

        t0, cpu0 = time.perf_counter(), _cpu_seconds(resource.RUSAGE_SELF)
        plain = plain_pyradiomics(first, settings)
        t_plain = time.perf_counter() - t0
        cpu_plain = _cpu_seconds(resource.RUSAGE_SELF) - cpu0
        rss_plain = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        per_case = t_plain / n
        log.info("plain PyRadiomics: %d cases in %.1f s (%.2f s/case)", n, t_plain, per_case)

        full = CohortStats()
        cpu0 = _cpu_seconds(resource.RUSAGE_CHILDREN) + _cpu_seconds(resource.RUSAGE_SELF)
        table, _ = extract_cohort(first, settings, n_jobs=args.n_jobs, cache_dir=tmp / "cache", allow_drop=False,
                                  grid_tolerance_mm=tolerance, show_progress=False, stats=full)
        cpu_ours = _cpu_seconds(resource.RUSAGE_CHILDREN) + _cpu_seconds(resource.RUSAGE_SELF) - cpu0
        log.info("ours (n_jobs=%d): %d cases in %.1f s", args.n_jobs, n, full.seconds)
        assert table.shape == (n, 2 + len(plain[0])), table.shape
        incremental = CohortStats()
        extract_cohort(added, settings, n_jobs=args.n_jobs, cache_dir=tmp / "cache", allow_drop=False,
                       grid_tolerance_mm=tolerance, show_progress=False, stats=incremental)
        log.info("after adding one case: %.2f s (%d cached, %d extracted)", incremental.seconds, incremental.n_cached, incremental.n_extracted)

    results = {
        "quick": args.quick,
        "n_cases": n,
        "n_jobs": args.n_jobs,
        "cpu_count": os.cpu_count(),
        "load_average_1min_at_end": os.getloadavg()[0],
        "n_features": len(plain[0]),
        "plain_seconds": round(t_plain, 2),
        "plain_cases_per_minute": round(n / t_plain * 60, 2),
        "ours_seconds": round(full.seconds, 2),
        "ours_cases_per_minute": round(n / full.seconds * 60, 2),
        "speedup": round(t_plain / full.seconds, 2),
        # CPU seconds (user + system) per case: independent of the other load on the machine.
        "plain_cpu_seconds_per_case": round(cpu_plain / n, 3),
        "ours_cpu_seconds_per_case": round(cpu_ours / n, 3),
        "projected_speedup_idle": round(min(args.n_jobs, os.cpu_count() or 1) * cpu_plain / cpu_ours, 2),
        "add_one_case_seconds": round(incremental.seconds, 2),
        "add_one_case_fraction_of_full": round(incremental.seconds / full.seconds, 4),
        "peak_rss_per_worker_mib": round(full.peak_worker_rss_mib, 1),
        "peak_rss_plain_process_mib": round(rss_plain, 1),
        "plain_seconds_per_full_size_case": round(per_case, 2),
        "estimated_minutes_full_cohort_178_cases_x_3_masks": round(178 * 3 * full.seconds / n / 60, 1),
    }
    common.print_json(results, args.json)
    return 0


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    sys.exit(main())
