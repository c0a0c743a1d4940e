"""The whole DVC pipeline on a tiny synthetic cohort (ci/smoke.sh), then `dvc repro` again is a no-op."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dvc_pipeline_smoke_run(tmp_path):
    work = tmp_path / "smoke"
    proc = subprocess.run(
        ["bash", str(REPO / "ci" / "smoke.sh"), str(work)], capture_output=True, encoding="utf-8", errors="replace",
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    assert "second repro must do nothing" in proc.stdout and "smoke run passed" in proc.stdout
    assert "misspelt keys refused" in proc.stdout
    for out in ["data/validation/report.json", "data/splits.json", "metrics/table1.json", "metrics/summary.json",
                "metrics/repeated.json", "reports/index.html"]:
        assert (work / out).exists(), out
