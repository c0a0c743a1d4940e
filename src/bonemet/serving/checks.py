"""Checks of feature rows sent to the classifier (HTTP /invocations or Python).

Every problem becomes a :class:`FeatureInputError` whose message names the rows and columns at
fault; the serving wrapper turns it into a 4xx answer, never a 500.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from bonemet.errors import UserError

#: Columns a client may send besides the features; they are echoed back or ignored.
PASSTHROUGH_COLUMNS = ("case_id", "label")
_SHOW = 5


class FeatureInputError(UserError, ValueError):
    """Feature rows do not match what the model expects."""


def _some(items: Sequence[str]) -> str:
    items = list(items)
    more = f" and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
    return ", ".join(map(str, items[:_SHOW])) + more


def check_feature_frame(frame: pd.DataFrame, feature_names: Sequence[str]) -> pd.DataFrame:
    """Return ``frame``'s features as float64 in the model's column order, or raise.

    Raises FeatureInputError for: no rows; missing feature columns; unknown columns; values
    that are not numbers (strings, booleans); NaN or infinite values.
    """
    if not isinstance(frame, pd.DataFrame):
        raise FeatureInputError(f"expected a table of feature rows, got {type(frame).__name__}")
    if frame.shape[0] == 0:
        raise FeatureInputError("empty input: no feature rows were sent")
    names = list(feature_names)
    columns = [str(c) for c in frame.columns]
    missing = [n for n in names if n not in columns]
    unknown = [c for c in columns if c not in names and c not in PASSTHROUGH_COLUMNS]
    if missing:
        raise FeatureInputError(
            f"missing {len(missing)} of {len(names)} feature columns: {_some(missing)}"
            + (f"; unknown columns sent: {_some(unknown)}" if unknown else "")
        )
    if unknown:
        raise FeatureInputError(f"unknown columns: {_some(unknown)} (expected the model's {len(names)} feature columns)")
    features = frame.loc[:, names]
    # dtype-level checks (not per-column Series): this runs on every served request.
    bad_type = [
        c
        for c, dtype in zip(names, features.dtypes, strict=True)
        if not (pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype))
    ]
    if bad_type:
        converted = features[bad_type].apply(pd.to_numeric, errors="coerce")
        offending = [c for c in bad_type if converted[c].isna().any() and features[c].notna().any()]
        if offending or any(pd.api.types.is_bool_dtype(features[c].dtype) for c in bad_type):
            col = (offending or bad_type)[0]
            rows = [str(i) for i in features.index[converted[col].isna() & features[col].notna()]][:_SHOW]
            raise FeatureInputError(
                f"non-numeric values in {len(offending or bad_type)} column(s), e.g. '{col}' at row(s) {', '.join(rows) or '?'}"
            )
        features = features.assign(**{c: converted[c] for c in bad_type})
    values = features.to_numpy(dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.all():
        bad_rows, bad_cols = np.where(~finite)
        cols = sorted({names[j] for j in bad_cols})
        rows = sorted({str(features.index[i]) for i in bad_rows})
        raise FeatureInputError(
            f"NaN or infinite values in {len(cols)} column(s) ({_some(cols)}) at row(s) {_some(rows)}"
        )
    return pd.DataFrame(values, columns=names, index=frame.index)
