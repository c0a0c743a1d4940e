"""The stages' side of the plan: params whose ``auto`` values are the plan's (explicit values win).

The library only takes values: a stage that needs a planned setting calls :func:`planned_params`
once (the plan file ``plan.out`` read and checked against the params it was made from) and passes
the resulting :class:`~bonemet.config.PlannedParams` sections on, whose planned settings have no
``auto`` (the library's entry points refuse one with :func:`bonemet.config.planned_spec`). A plan made from other params (a changed budget, profile or explicit value,
without rerunning the plan stage) is refused with :class:`PlanMismatchError`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bonemet.config import PLANNED_KEYS, PlanRequiredError, planned_spec, unplanned_keys
from bonemet.errors import UserError
from bonemet.planning.plan import PLAN_SCHEMA, PlanInputs

if TYPE_CHECKING:  # pragma: no cover
    from bonemet.config import Params, PlannedParams

#: what to run when the plan is missing or stale
RERUN = "run `bonemet plan` (or `dvc repro`, which runs the plan stage first)"


class PlanMismatchError(UserError, ValueError):
    """The plan file was made from other params, or is not a plan."""


def read_plan(path: str | Path) -> dict[str, Any]:
    """The plan document at ``path``.

    Raises:
        PlanRequiredError: no file there.
        PlanMismatchError: not a plan of this version.
    """
    path = Path(path)
    if not path.is_file():
        raise PlanRequiredError(f"{path}: no plan, and params leave settings to it ('auto'); {RERUN}, or set "
                                f"explicit values for {', '.join(PLANNED_KEYS)} in params.yaml")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanMismatchError(f"{path}: not a readable plan ({exc}); {RERUN}") from None
    if not isinstance(doc, dict) or doc.get("schema") != PLAN_SCHEMA or not isinstance(doc.get("values"), dict):
        raise PlanMismatchError(f"{path}: not a plan of schema {PLAN_SCHEMA}; {RERUN}")
    return doc


def apply_values(params: Params, values: Mapping[str, Any]) -> Params:
    """``params`` with the planned keys in ``values`` (dotted params paths) set, validated by the specs."""
    sections: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        if key not in PLANNED_KEYS:
            raise KeyError(f"{key} is not a planned setting (one of {', '.join(PLANNED_KEYS)})")
        head, _, rest = key.partition(".")
        sections.setdefault(head, {})[rest] = value
    update = {name: getattr(params, name).updated(changes) for name, changes in sections.items()}
    return params.model_copy(update=update)


def _differences(recorded: Any, current: Any, prefix: str = "") -> list[str]:
    if isinstance(recorded, Mapping) and isinstance(current, Mapping):
        out = []
        for key in sorted(set(recorded) | set(current)):
            out += _differences(recorded.get(key, "(absent)"), current.get(key, "(absent)"), f"{prefix}{key}.")
        return out
    return [] if recorded == current else [f"{prefix.rstrip('.')} (plan: {recorded!r}, params: {current!r})"]


def resolve_params(params: Params, plan: Mapping[str, Any], where: str = "the plan") -> PlannedParams:
    """``params`` with every ``auto`` planned setting replaced by ``plan``'s value.

    Raises:
        PlanMismatchError: ``plan`` was made from other params (its ``inputs`` differ).
    """
    current = PlanInputs.from_params(params).to_dict()
    differences = _differences(plan.get("inputs", {}), current)
    if differences:
        shown = "; ".join(differences[:5]) + (f"; and {len(differences) - 5} more" if len(differences) > 5 else "")
        raise PlanMismatchError(f"{where} was made from other params: {shown}; {RERUN}")
    auto = [k for section in ("preprocess", "segment") for k in unplanned_keys(getattr(params, section), section)]
    return planned_spec(apply_values(params, {k: plan["values"][k]["value"] for k in auto}), where)


def planned_params(params: Params, plan: Mapping[str, Any] | None = None) -> PlannedParams:
    """``params`` with the plan applied, once: from ``plan`` (the plan document, when the caller has
    read it) or the plan file ``params.plan.out`` (unread when nothing is ``auto``).

    Raises:
        PlanRequiredError: a setting is ``auto`` and there is no plan file.
        PlanMismatchError: the plan was made from other params.
    """
    if plan is not None:
        return resolve_params(params, plan, where=params.plan.out)
    if not any(unplanned_keys(getattr(params, section), section) for section in ("preprocess", "segment")):
        return planned_spec(params, "planned_params")
    return resolve_params(params, read_plan(params.plan.out), where=params.plan.out)
