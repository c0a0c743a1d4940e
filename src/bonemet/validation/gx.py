"""Great Expectations behind one small, generic interface (the ONLY import of great_expectations).

Callers describe their checks as :class:`Rule` objects (a GX Core expectation class name plus
its keyword arguments) over a pandas table with one row per entity (a case, a feature row)
and get back one :class:`RuleResult` per rule, naming the ids of the rows that broke it.

Each call builds one in-memory (ephemeral) GX context, one batch and one suite: nothing is
written to disk (no ``gx/`` project folder), no usage statistics are sent, progress bars and
GX's own logging are off, so a call over a few hundred rows takes well under a second.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from bonemet.errors import BonemetError


@functools.cache
def _gx() -> Any:
    """great_expectations, imported on first use (slow to import), with usage statistics off.

    GX reads ``GX_ANALYTICS_ENABLED`` while importing, so it is set (unless the user set it)
    just before the import, never at the import of this module; the context config below says
    the same. GX logs INFO chatter while importing: its loggers stay at WARNING.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations

    return great_expectations


log = logging.getLogger(__name__)

SEVERITIES = ("hard", "soft")
_MAX_DETAIL_VALUES = 5


class RuleError(BonemetError, ValueError):
    """A rule is malformed: unknown expectation, bad arguments, duplicate name or severity."""


@dataclass(frozen=True)
class Rule:
    """One check over a table, expressed as a GX Core expectation.

    Attributes:
        name: unique name of the rule within one :func:`check_table` call (e.g. ``"hu_range"``).
        expectation: class name in ``great_expectations.expectations``
            (e.g. ``"ExpectColumnValuesToBeBetween"``).
        kwargs: keyword arguments of that expectation (``column=``, ``min_value=``, ``mostly=`` ...).
        severity: ``"hard"`` (the data is unusable) or ``"soft"`` (worth a warning).
        description: one human sentence saying what the rule requires, used in reports.
    """

    name: str
    expectation: str
    kwargs: dict = field(default_factory=dict)
    severity: str = "hard"
    description: str = ""


@dataclass
class RuleResult:
    """The outcome of one :class:`Rule`.

    Attributes:
        rule: the rule's name.
        severity: the rule's severity.
        success: GX's verdict (a rule with ``mostly`` can succeed with some failing rows).
        failing_ids: ids (``id_column`` values, as strings, each once, in table order) of the rows
            the expectation flagged; empty for table-level expectations.
        detail: one readable line: what was expected and what was found.
        unexpected: failing id -> the offending value (first one per id), for column-map
            expectations.
    """

    rule: str
    severity: str
    success: bool
    failing_ids: list[str]
    detail: str
    unexpected: dict[str, Any] = field(default_factory=dict)


def _quiet_gx() -> None:
    for name in ("great_expectations", "great_expectations.core", "great_expectations.data_context"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _context() -> Any:
    """A fresh in-memory GX context: no files, no analytics, no progress bars."""
    gx = _gx()
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _build_expectation(rule: Rule) -> Any:
    if rule.severity not in SEVERITIES:
        raise RuleError(f"rule '{rule.name}': severity '{rule.severity}' is not one of {SEVERITIES}")
    cls = getattr(_gx().expectations, rule.expectation, None)
    if cls is None or not isinstance(cls, type):
        raise RuleError(
            f"rule '{rule.name}': '{rule.expectation}' is not a great_expectations.expectations class"
        )
    try:
        return cls(**rule.kwargs, meta={"bonemet_rule": rule.name})
    except Exception as exc:  # pydantic ValidationError and friends
        raise RuleError(f"rule '{rule.name}': invalid arguments for {rule.expectation}: {exc}") from exc


def _exception_message(info: Any) -> str | None:
    """The first exception message in a GX ``exception_info`` (flat or keyed by metric)."""
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message") or "GX raised an exception")
    for value in info.values():
        if isinstance(value, dict) and value.get("raised_exception"):
            return str(value.get("exception_message") or "GX raised an exception")
    return None


def _plain(value: Any) -> Any:
    """NumPy scalars -> Python; NaN -> None (JSON-friendly)."""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, TypeError):
            pass
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _describe(rule: Rule, result: dict, n_failing: int) -> str:
    what = (
        rule.description or f"{rule.expectation}({', '.join(f'{k}={v!r}' for k, v in rule.kwargs.items())})"
    )
    if "unexpected_count" in result:
        values = [_plain(v) for v in result.get("unexpected_list") or []][:_MAX_DETAIL_VALUES]
        shown = f"; e.g. {values}" if values else ""
        return (
            f"{what}: {result['unexpected_count']} of {result.get('element_count', '?')} values unexpected "
            f"({n_failing} row(s)){shown}"
        )
    found = []
    if result.get("observed_value") is not None:
        found.append(f"observed {_plain(result['observed_value'])!r}")
    if result.get("details"):
        found.append(f"details {result['details']!r}")
    return f"{what} ({'; '.join(found)})" if found else what


def check_table(
    df: pd.DataFrame,
    rules: Sequence[Rule],
    id_column: str = "case_id",
    suite_name: str = "bonemet",
) -> list[RuleResult]:
    """Validate ``df`` against ``rules`` with Great Expectations; one result per rule, in rule order.

    Args:
        df: the table, one row per entity; it is not modified.
        rules: the checks; names must be unique.
        id_column: column naming each row in ``failing_ids``; when absent, the row index is used.
        suite_name: name of the (in-memory) expectation suite, shown in GX's own messages.

    Returns:
        A :class:`RuleResult` per rule. A rule GX cannot evaluate (e.g. its column is missing)
        is reported as failed with GX's error message as detail; it does not raise.

    Raises:
        RuleError: a rule names an unknown expectation, has invalid arguments, an unknown
            severity, or two rules share a name.
    """
    names = [rule.name for rule in rules]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise RuleError(f"duplicate rule name(s): {', '.join(duplicated)}")
    if not rules:
        return []
    _quiet_gx()
    expectations = [_build_expectation(rule) for rule in rules]

    has_ids = id_column in df.columns
    table = df.reset_index(drop=True) if has_ids else df.reset_index(drop=False, names="__row__")
    index_column = id_column if has_ids else "__row__"

    validation = _validate(table, expectations, suite_name, index_column)
    by_name: dict[str, Any] = {}
    for res in validation.results:
        by_name[res.expectation_config.meta.get("bonemet_rule")] = res
    return [_rule_result(rule, by_name.get(rule.name), index_column) for rule in rules]


def _validate(table: pd.DataFrame, expectations: Sequence[Any], suite_name: str, index_column: str) -> Any:
    """GX's validation of ``table`` against one in-memory suite of ``expectations`` (complete
    results, unexpected rows named by ``index_column``); GX's warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        context = _context()
        asset = context.data_sources.add_pandas(name=f"{suite_name}_source").add_dataframe_asset(
            name=suite_name
        )
        batch = asset.add_batch_definition_whole_dataframe(name=f"{suite_name}_batch").get_batch(
            batch_parameters={"dataframe": table}
        )
        suite = _gx().ExpectationSuite(name=suite_name)
        for expectation in expectations:
            suite.add_expectation(expectation)
        return batch.validate(
            suite,
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [index_column]},
        )


def _rule_result(rule: Rule, res: Any, index_column: str) -> RuleResult:
    """``rule``'s :class:`RuleResult` from GX's result ``res`` of its expectation (None: GX gave
    none): the failing ids, each once in table order, with its first offending value."""
    if res is None:  # pragma: no cover - GX returns one result per expectation
        return RuleResult(rule.name, rule.severity, False, [], "GX returned no result for this rule")
    error = _exception_message(res.exception_info)
    if error is not None:
        return RuleResult(rule.name, rule.severity, False, [], f"{rule.description or rule.expectation}: {error}")
    result = dict(res.result or {})
    failing: list[str] = []
    unexpected: dict[str, Any] = {}
    for entry in result.get("unexpected_index_list") or []:
        if isinstance(entry, dict):
            row_id = str(_plain(entry.get(index_column)))
            others = [v for k, v in entry.items() if k != index_column]
            value = _plain(others[0]) if others else _plain(entry.get(index_column))
        else:
            row_id, value = str(_plain(entry)), None
        if row_id not in unexpected:
            failing.append(row_id)
            unexpected[row_id] = value
    return RuleResult(
        rule=rule.name,
        severity=rule.severity,
        success=bool(res.success),
        failing_ids=failing,
        detail=_describe(rule, result, len(failing)),
        unexpected=unexpected,
    )
