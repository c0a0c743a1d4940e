"""Feature-table rules (GX): columns, ids, finiteness, positive shape features."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bonemet.validation.features import (
    POSITIVE_SHAPE_FEATURES,
    FeatureTableError,
    assert_feature_table,
    check_feature_table,
    hard_failures,
)

NAMES = [*POSITIVE_SHAPE_FEATURES, "original_firstorder_Mean", "wavelet-LLH_glcm_Idm"]


def _table(n: int = 6) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    table = pd.DataFrame(rng.uniform(1.0, 5.0, size=(n, len(NAMES))), columns=NAMES)
    table.insert(0, "label", np.arange(n, dtype=np.int64) % 2)
    table.insert(0, "case_id", [f"case{i}" for i in range(n)])
    return table


def _failed(table: pd.DataFrame) -> dict[str, list[str]]:
    return {r.rule: r.failing_ids for r in hard_failures(check_feature_table(table, NAMES))}


def test_good_table_passes():
    results = assert_feature_table(_table(), NAMES, "manual")
    assert results and all(r.success for r in results)


def test_nan_and_inf_are_flagged_with_case_and_feature():
    table = _table()
    table.loc[1, "original_firstorder_Mean"] = np.nan
    table.loc[4, "wavelet-LLH_glcm_Idm"] = np.inf
    results = {r.rule: r for r in check_feature_table(table, NAMES)}
    finite = results["all_features_finite"]
    assert not finite.success and finite.failing_ids == ["case1", "case4"]
    assert "original_firstorder_Mean" in finite.detail and "wavelet-LLH_glcm_Idm" in finite.detail


def test_duplicate_case_nonpositive_volume_and_wrong_columns():
    table = _table()
    table.loc[2, "case_id"] = "case3"
    table.loc[5, "original_shape_MeshVolume"] = 0.0
    failed = _failed(table)
    assert failed["one_row_per_case"] == ["case3"]
    assert failed["positive_original_shape_MeshVolume"] == ["case5"]
    assert "expected_columns" not in failed

    reordered = _table()[["label", "case_id", *NAMES]]
    assert "expected_columns" in _failed(reordered)
    missing = _table().drop(columns=["wavelet-LLH_glcm_Idm"])
    assert "expected_columns" in _failed(missing)


def test_assert_feature_table_names_source_rule_and_cases():
    table = _table()
    table.loc[0, "label"] = 2
    with pytest.raises(FeatureTableError, match=r"'auto'.*label_binary.*case0") as info:
        assert_feature_table(table, NAMES, "auto")
    # a user's bad table: the command line prints it as one line (exit 1); except ValueError still works
    from bonemet.errors import UserError

    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)
