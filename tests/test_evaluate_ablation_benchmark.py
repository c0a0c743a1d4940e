"""benchmarks/evaluate_ablation.py --quick: every variant of the chain, the baseline and both feature
sources over the repeated splits, with finite numbers (a plumbing check on a synthetic table made by
the script, seconds; the measurement itself is in benchmarks/evaluate.md)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_evaluate_ablation", REPO / "benchmarks" /
                                                  "evaluate_ablation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmark_evaluate_ablation"] = module
    spec.loader.exec_module(module)
    return module


def _finite(interval: dict) -> bool:
    return all(math.isfinite(interval[k]) for k in ("mean", "sd", "lo", "hi"))


@pytest.mark.slow
def test_quick_mode_has_every_variant_with_finite_numbers(tmp_path, capsys):
    bench = _benchmark()
    out = tmp_path / "ablation.json"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    variants = list(bench.VARIANTS)
    assert result["quick"] and result["models"] == ["svm"] and list(result["variants"]) == variants
    assert len(result["records"]) == bench.QUICK_REPEATS == result["summary"]["n_repeats"]
    assert [r["seed"] for r in result["records"]] == [result["seed"] + r for r in range(bench.QUICK_REPEATS)]
    summary = result["summary"]
    assert set(summary["sources"]) == {"auto", "manual"}
    for entry in summary["sources"].values():
        assert _finite(entry["baseline"]["auc"])
        assert set(entry["models"]["svm"]) == set(variants)
        for variant, values in entry["models"]["svm"].items():
            assert 0.0 <= values["auc"]["mean"] <= 1.0
            assert _finite(values["auc"]) and _finite(values["minus_baseline"])
            if variant == "configured":
                assert values["minus_configured"]["mean"] == 0.0
            assert math.isfinite(values["minus_configured"]["mean"])
    assert set(summary["manual_minus_auto"]["svm"]) == set(variants)
    assert all(math.isfinite(d["mean"]) for d in summary["manual_minus_auto"]["svm"].values())
    table = capsys.readouterr().out
    assert table.count("| svm |") == 2 * len(variants) and "baseline" in table
