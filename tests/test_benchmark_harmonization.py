"""benchmarks/harmonization.py in its quick mode: a two-site cohort made and extracted, test AUC with
and without ComBat over repeated splits (the full run is the lead's: see the script's docstring)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_harmonization", REPO / "benchmarks" / "harmonization.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmark_harmonization"] = module
    spec.loader.exec_module(module)
    return module


def test_quick_mode_records_both_aucs_per_split(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # params.yaml
    bench = _benchmark()
    out = tmp_path / "result.json"
    assert bench.main(["--quick", str(tmp_path / "cohort"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result == json.loads(capsys.readouterr().out)
    assert result["repeats"] == 2 and len(result["splits"]) == 2 and result["n_cases"] == bench.QUICK_CASES
    assert result["sites"] == {"site_a": 12, "site_b": 12}
    for row in result["splits"]:
        assert set(row) == {"raw_auc", "combat_auc", "llr_auc", "site_auc_raw", "site_auc_combat"}
        assert all(0.0 <= v <= 1.0 for v in row.values())
    assert math.isclose(result["combat_minus_raw_mean"],
                        sum(r["combat_auc"] - r["raw_auc"] for r in result["splits"]) / 2, abs_tol=1e-3)
    assert (tmp_path / "cohort" / "features" / "annotator.parquet").is_file()
