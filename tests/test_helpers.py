"""The one copy of each small helper the library shares (rounding for byte-stable JSON, short lists
in messages, finite metrics for the tracker)."""

from __future__ import annotations

import math

import numpy as np

from bonemet.tracking import finite_metrics
from bonemet.utils import json_rounded, some


def test_json_rounded_rounds_every_float_and_nulls_what_json_cannot_hold():
    value = {"a": 0.12345678, "b": [1.0000004, (2.5, math.nan)], "c": {"d": math.inf, "e": 3, "f": "x"}}
    assert json_rounded(value) == {"a": 0.123457, "b": [1.0, [2.5, None]], "c": {"d": None, "e": 3, "f": "x"}}
    assert json_rounded(1.23456, 2) == 1.23 and json_rounded(True) is True


def test_some_names_the_first_few_and_counts_the_rest():
    assert some(["a", "b"]) == "a, b"
    assert some(range(8)) == "0, 1, 2, 3, 4 and 3 more"
    assert some(["x", "y", "z"], show=1) == "x and 2 more"


def test_finite_metrics_keeps_finite_numbers_only():
    metrics = {"auc": 0.8, "n": 3, "f32": np.float32(0.5), "nan": math.nan, "inf": -math.inf, "none": None,
               "text": "svm", "flag": True}
    assert finite_metrics(metrics) == {"auc": 0.8, "n": 3.0, "f32": 0.5}
