"""Checks of feature rows sent to the classifier (HTTP /invocations or Python).

A client sends PyRadiomics feature rows: any of the columns the model was trained on (all 1316
usually), plus an optional ``case_id`` (echoed) and ``label`` (ignored). The model reads only the
columns it needs (:attr:`FeatureContract.required`: the features its pipeline selected, or every
feature when the pipeline cannot be cut down), so only those are checked value by value; the
other known columns are accepted and ignored. Checks over column names are set-based: one pass
over the sent columns, whatever their number.

Every problem becomes a :class:`FeatureInputError` whose message names the rows and columns at
fault, never the values sent (answers and server logs must not carry feature values); the
serving wrapper turns it into a 4xx answer, never a 500.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from bonemet.errors import UserError
from bonemet.utils import some

#: Columns a client may send besides the features; they are echoed back or ignored.
PASSTHROUGH_COLUMNS = ("case_id", "label")


class FeatureInputError(UserError, ValueError):
    """Feature rows do not match what the model expects."""


@dataclass(frozen=True)
class FeatureContract:
    """Which columns a feature row may and must hold.

    Attributes:
        known: every feature column the model accepts (its training columns).
        required: the numeric feature columns the model reads, in the order it reads them.
        text_columns: required text columns the model reads too (``site`` for a pipeline that
            harmonises per site); checked to be non-empty.
        optional: numeric columns read when present (e.g. the lesion volume for the domain
            check); checked like ``required`` when sent.
    """

    known: tuple[str, ...]
    required: tuple[str, ...]
    text_columns: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    _allowed: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        allowed = frozenset(self.known) | frozenset(PASSTHROUGH_COLUMNS) | frozenset(self.text_columns)
        object.__setattr__(self, "_allowed", allowed)
        outside = [c for c in (*self.required, *self.optional) if c not in allowed]
        if outside:
            raise ValueError(f"required or optional columns outside the known ones: {some(outside)}")

    def read(self, frame: pd.DataFrame) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
        """``(values, texts, optional)`` of ``frame``, or raise :class:`FeatureInputError`.

        ``values``: float64 ``(n_rows, len(required))`` in ``required``'s order; ``texts``: the
        text columns as str arrays; ``optional``: the optional columns that were sent, as float64.
        Refused: not a table; no rows; duplicate, unknown or missing column names; values of a
        read column that are not numbers (strings, booleans, null) or not finite; an empty text.
        """
        if not isinstance(frame, pd.DataFrame):
            raise FeatureInputError(f"expected a table of feature rows, got {type(frame).__name__}")
        if frame.shape[0] == 0:
            raise FeatureInputError("empty input: no feature rows were sent")
        # pandas 3: iterating a string Index is several times slower than its tolist(); set
        # operations run in C (this runs on every served request, over ~1316 names)
        columns = list(map(str, frame.columns.tolist()))
        present = set(columns)
        if len(present) != len(columns):
            seen: set[str] = set()
            duplicated = sorted({c for c in columns if c in seen or seen.add(c)})
            raise FeatureInputError(f"duplicate columns: {some(duplicated)}")
        if not present <= self._allowed:
            outside = present - self._allowed
            unknown = [c for c in columns if c in outside]
            raise FeatureInputError(
                f"unknown columns: {some(unknown)} (expected the model's PyRadiomics feature columns, "
                f"optionally {' and '.join(PASSTHROUGH_COLUMNS)})"
            )
        missing = [c for c in (*self.required, *self.text_columns) if c not in present]
        if missing:
            n_needed = len(self.required) + len(self.text_columns)
            raise FeatureInputError(f"missing {len(missing)} of the {n_needed} columns the model reads: {some(missing)}")
        values = _numeric(frame, list(self.required))
        texts = {c: _text(frame, c) for c in self.text_columns}
        sent = [c for c in self.optional if c in present]
        optional = dict(zip(sent, _numeric(frame, sent).T, strict=True)) if sent else {}
        return values, texts, optional


def _numeric(frame: pd.DataFrame, names: list[str]) -> np.ndarray:
    """``frame[names]`` as float64 ``(n_rows, len(names))``; non-numbers (strings, booleans, null)
    and non-finite values refused. Column by column: on a 1316-column frame, taking a few columns
    one at a time is ~10x cheaper than ``frame[names]`` (this runs on every served request)."""
    values = np.empty((len(frame), len(names)), dtype=np.float64, order="F")
    wrong = []
    for j, name in enumerate(names):
        column = frame[name]
        dtype = column.dtype
        if pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype):
            values[:, j] = column.to_numpy(dtype=np.float64, na_value=np.nan)
            continue
        # an object column of numbers (JSON null among them, or integers among floats) is fine
        is_number = column.map(_is_number).to_numpy(dtype=bool) if not pd.api.types.is_bool_dtype(dtype) else None
        if is_number is None or not is_number.all():
            rows = [str(i) for i in frame.index[~is_number]] if is_number is not None else []
            wrong.append(f"{name} (row {some(rows)})" if rows else name)
            continue
        values[:, j] = pd.to_numeric(column).to_numpy(dtype=np.float64, na_value=np.nan)
    if wrong:
        raise FeatureInputError(
            f"non-numeric values (text, true/false) in {len(wrong)} column(s): {some(wrong)}; expected numbers"
        )
    finite = np.isfinite(values)
    if not finite.all():
        bad_rows, bad_cols = np.where(~finite)
        cols = sorted({names[j] for j in bad_cols})
        rows = sorted({str(frame.index[i]) for i in bad_rows})
        raise FeatureInputError(
            f"missing (null), NaN or infinite values in {len(cols)} column(s) ({some(cols)}) at row(s) {some(rows)}"
        )
    return values


def _is_number(value: object) -> bool:
    """A JSON number or null: not text, not true/false."""
    if value is None:
        return True
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool | np.bool_)


def _text(frame: pd.DataFrame, name: str) -> np.ndarray:
    texts = frame[name].astype("string").str.strip()
    empty = (texts.isna() | (texts == "")).to_numpy(dtype=bool)
    if empty.any():
        raise FeatureInputError(f"empty '{name}' at row(s) {some([str(i) for i in frame.index[empty]])}")
    return texts.to_numpy(dtype=str)


def check_feature_frame(frame: pd.DataFrame, feature_names: Sequence[str]) -> pd.DataFrame:
    """``frame``'s features as float64 in the model's column order, or raise :class:`FeatureInputError`.

    Every one of ``feature_names`` is required (see :meth:`FeatureContract.read`).
    """
    names = tuple(feature_names)
    values, _, _ = FeatureContract(known=names, required=names).read(frame)
    return pd.DataFrame(values, columns=list(names), index=frame.index)
