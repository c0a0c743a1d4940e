"""Rules for a radiomics feature table (``data/features/<source>.parquet``), checked with GX.

A table has columns ``case_id``, ``label`` then the PyRadiomics features in a fixed order;
one row per case; every feature finite; the shape features that measure size positive.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from bonemet.errors import UserError
from bonemet.validation.gx import Rule, RuleResult, check_table

ID_COLUMNS = ("case_id", "label")
POSITIVE_SHAPE_FEATURES = (
    "original_shape_VoxelVolume",
    "original_shape_MeshVolume",
    "original_shape_SurfaceArea",
    "original_shape_MajorAxisLength",
)
NONFINITE_COLUMN = "n_nonfinite_features"
_MAX_NAMED = 5


class FeatureTableError(UserError, ValueError):
    """A feature table broke a hard rule; the message names the source, rules and cases."""


def feature_table_rules(feature_names: Sequence[str]) -> list[Rule]:
    """Rules over the feature table itself (columns, ids, labels, positive shape features)."""
    rules = [
        Rule(
            "expected_columns",
            "ExpectTableColumnsToMatchOrderedList",
            {"column_list": [*ID_COLUMNS, *feature_names]},
            description=f"columns are case_id, label, then the {len(feature_names)} expected features in order",
        ),
        Rule("case_id_present", "ExpectColumnValuesToNotBeNull", {"column": "case_id"}, description="every row has a case_id"),
        Rule("one_row_per_case", "ExpectColumnValuesToBeUnique", {"column": "case_id"}, description="one row per case_id"),
        Rule("label_binary", "ExpectColumnValuesToBeInSet", {"column": "label", "value_set": [0, 1]}, description="label is 0 or 1"),
    ]
    for name in POSITIVE_SHAPE_FEATURES:
        if name in feature_names:
            rules.append(
                Rule(
                    f"positive_{name}",
                    "ExpectColumnValuesToBeBetween",
                    {"column": name, "min_value": 0, "strict_min": True},
                    description=f"{name} > 0 (a lesion has a size)",
                )
            )
    return rules


def nonfinite_rules() -> list[Rule]:
    """Rule over the per-row count of NaN/inf features (see :func:`nonfinite_summary`)."""
    return [
        Rule(
            "all_features_finite",
            "ExpectColumnValuesToBeBetween",
            {"column": NONFINITE_COLUMN, "min_value": 0, "max_value": 0},
            description="every feature is finite (no NaN, no infinity)",
        )
    ]


def nonfinite_summary(df: pd.DataFrame, feature_names: Sequence[str]) -> pd.DataFrame:
    """``case_id`` and the number of non-finite features per row (one column per row is cheap to check)."""
    present = [n for n in feature_names if n in df.columns]
    values = df[present].to_numpy(dtype=np.float64, na_value=np.nan) if present else np.zeros((len(df), 0))
    counts = (~np.isfinite(values)).sum(axis=1).astype(np.int64)
    ids = df["case_id"].astype(str).to_numpy() if "case_id" in df.columns else np.arange(len(df)).astype(str)
    return pd.DataFrame({"case_id": ids, NONFINITE_COLUMN: counts})


def check_feature_table(df: pd.DataFrame, feature_names: Sequence[str]) -> list[RuleResult]:
    """Run every feature-table rule; one :class:`RuleResult` per rule."""
    results = check_table(df, feature_table_rules(feature_names), id_column="case_id", suite_name="features")
    summary = nonfinite_summary(df, feature_names)
    finite = check_table(summary, nonfinite_rules(), id_column="case_id", suite_name="features_finite")
    for result in finite:
        if not result.success:
            result.detail += "; " + _name_nonfinite(df, feature_names, result.failing_ids)
    return results + finite


def _name_nonfinite(df: pd.DataFrame, feature_names: Sequence[str], ids: Sequence[str]) -> str:
    present = [n for n in feature_names if n in df.columns]
    parts = []
    for case_id in list(ids)[:_MAX_NAMED]:
        row = df.loc[df["case_id"].astype(str) == case_id, present].to_numpy(dtype=np.float64, na_value=np.nan)[0]
        bad = [present[i] for i in np.flatnonzero(~np.isfinite(row))]
        parts.append(f"case '{case_id}': {', '.join(bad[:_MAX_NAMED])}{' ...' if len(bad) > _MAX_NAMED else ''}")
    return "; ".join(parts)


def hard_failures(results: Sequence[RuleResult]) -> list[RuleResult]:
    """The failed hard rules."""
    return [r for r in results if r.severity == "hard" and not r.success]


def assert_feature_table(df: pd.DataFrame, feature_names: Sequence[str], source: str) -> list[RuleResult]:
    """Check a table and raise :class:`FeatureTableError` naming every failed hard rule."""
    results = check_feature_table(df, feature_names)
    failed = hard_failures(results)
    if failed:
        lines = "; ".join(
            f"{r.rule}: {r.detail}" + (f" (cases {', '.join(r.failing_ids[:_MAX_NAMED])})" if r.failing_ids else "")
            for r in failed
        )
        raise FeatureTableError(f"feature table '{source}': {len(failed)} rule(s) failed: {lines}")
    return results
