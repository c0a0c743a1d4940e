"""benchmarks/serving.py --quick: both servers start, answer, and the bonemet one bit for bit.

A plumbing check (2 s per load on a synthetic table), so the benchmark script cannot rot; the
measurement itself is the full run, on a quiet machine (benchmarks/serving.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_serving_benchmark_quick_mode(tmp_path):
    out = tmp_path / "serving.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "serving.py"), "--quick", "--out", str(out)],
                          capture_output=True, encoding="utf-8", errors="replace", timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["quick"] and report["serving_mode"] == "reduced"
    runs = {(r["model"], r["clients"]) for r in report["results"]}
    assert runs == {(model, clients) for model in ("plain", "anchor", "bonemet") for clients in (1, 4)}
    assert all(r["requests"] > 0 and r["non2xx"] == 0 for r in report["results"])
    assert report["summary"]["throughput_ratio"] > 1  # even on a busy machine: no schema work per column
    split = report["summary"]["phase_split_ms"]
    assert split["engine"] == "direct"  # the benchmark's model is the registered family, the SVM
    assert all(split[k] > 0 for k in ("parse_pandas", "parse", "checks", "model", "answer_json", "invocations"))
    assert report["machine"]["cpu_model"] is not None and report["commit"]
