"""Every benchmark script runs: its quick mode (tiny sizes, seconds) as a subprocess, as a user would
run it, exits 0 and writes its result. So the scripts cannot rot when the library's API changes.

Adding a script: one line in QUICK (its quick-mode arguments, ``{tmp}`` for a scratch folder and
``{json}`` for the result file, and the keys its result must hold). A script tested elsewhere goes
in TESTED_ELSEWHERE; one without a quick mode yet in PENDING, with who adds it. A test fails for
a script in none of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"

#: script -> (quick-mode arguments, keys the result JSON must hold)
QUICK: dict[str, tuple[list[str], set[str]]] = {
    "radiomics.py": (["--quick", "--json", "{json}"], {"plain_seconds", "ours_seconds", "n_features"}),
    "predict.py": (["--quick", "--json", "{json}"], {"machine", "models", "rows"}),
    "inference.py": (["--quick", "--work", "{tmp}/work", "--json", "{json}"], {"machine", "rows", "train_seconds"}),
    "latent_recovery.py": (["--quick", "{tmp}/cohort", "--json", "{json}"], None),
    # issue 14: the default cohort and a second scanner protocol, each with its own plan
    "segmentation.py": (["--quick", "--cohorts", "default,site_b", "--work", "{tmp}/work", "--json", "{json}"],
                        {"machine", "cohorts", "variant"}),
    # issue 23 §2: a grid of scanner protocols, one cohort of the second generator per cell
    "segmentation_grid.py": (["--quick", "--work", "{tmp}/work", "--json", "{json}"],
                             {"machine", "commit", "cells", "targets", "clinical_range"}),
    # issue 23 §1: one epoch's phases and the levers
    "segmentation_profile.py": (["--quick", "--work", "{tmp}/work", "--json", "{json}"],
                                {"machine", "phases_s", "levers", "native_bf16", "peak_rss_mib"}),
}
#: scripts whose quick mode another test runs (gpu_check.sh --cpu runs networks.py and segmentation.py --quick;
#: segmentation.py's --cohorts mode is in QUICK)
TESTED_ELSEWHERE = {"harmonization.py": "tests/test_benchmark_harmonization.py", "fuzz.py": "tests/test_fuzz.py",
                    "networks.py": "tests/test_benchmarks.py",
                    "evaluate_ablation.py": "tests/test_evaluate_ablation_benchmark.py"}
#: scripts without a quick mode yet, and who brings it (issue 16 §1, issue 13)
PENDING = {"serving.py": "the serving branch (issue 16 §1)", "cohort_variation.py": "the cohorts branch (issue 13)"}


def test_every_benchmark_script_has_its_quick_mode_tested():
    scripts = {p.name for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_")}
    untested = scripts - set(QUICK) - set(TESTED_ELSEWHERE) - set(PENDING)
    assert not untested, f"benchmark scripts without a quick-mode test: {sorted(untested)} (add them to QUICK)"
    assert not (set(QUICK) | set(TESTED_ELSEWHERE) | set(PENDING)) - scripts, "a listed script does not exist"
    for where in TESTED_ELSEWHERE.values():
        assert (REPO / where).is_file()


def _run(command: list[str], tmp_path: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUTF8": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "MPLBACKEND": "Agg"}
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(QUICK))
def test_quick_mode_runs_and_writes_its_result(script, tmp_path):
    args, keys = QUICK[script]
    out = tmp_path / "result.json"
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{json}", str(out)) for a in args]
    proc = _run([sys.executable, str(BENCHMARKS / script), *argv], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result
    if keys is not None:
        assert keys <= set(result), f"{script}: result lacks {sorted(keys - set(result))}"


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_with_tiny_sizes(tmp_path):
    """benchmarks/gpu_check.sh's CPU mode: the same steps as on a GPU, tiny sizes, one summary file."""
    env_out = tmp_path / "results"
    proc = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), "--cpu"], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHON": sys.executable, "GPU_CHECK_OUT": str(env_out)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((env_out / "gpu_check.json").read_text())
    assert summary["mode"] == "cpu" and summary["card"].startswith("cpu")
    assert set(summary["train_step_s"]) == {"missu", "unetr"} and summary["missu_over_unetr"] > 0
    assert summary["clinical_ct_inference"]["seconds"] > 0 and summary["fold_epochs"]["missu"]["epochs_per_fold"] == [1]
    networks = json.loads((env_out / "gpu_networks.json").read_text())
    assert [r["network"] for r in networks["rows"]] == ["missu", "unetr"] and networks["profile"] == "cpu"
    assert all(r["params_train"] > 0 and r["sliding_window_s"] > 0 for r in networks["rows"])
    segmentation = json.loads((env_out / "gpu_segmentation.json").read_text())
    assert 0.0 <= segmentation["results"]["missu"]["dice_mean"] <= 1.0 and segmentation["quick"]
