"""Optuna search spaces: one format for the classifiers and for segmentation.

A space maps a hyperparameter name to a :class:`~bonemet.config.FloatRange`,
:class:`~bonemet.config.IntRange` or :class:`~bonemet.config.Choice` (``train.search_space``
and ``segment.tune.search_space`` in params.yaml: ``{type: float, low, high, log}``,
``{type: int, low, high, step, log}``, ``{type: categorical, choices}``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bonemet.config import Choice, FloatRange, IntRange


def suggest(trial: Any, space: Mapping[str, FloatRange | IntRange | Choice]) -> dict[str, Any]:
    """One trial's hyperparameters from ``space`` (names in the space's order)."""
    params: dict[str, Any] = {}
    for name, spec in space.items():
        if isinstance(spec, FloatRange):
            params[name] = trial.suggest_float(name, spec.low, spec.high, log=spec.log)
        elif isinstance(spec, IntRange):
            params[name] = trial.suggest_int(name, spec.low, spec.high, step=spec.step, log=spec.log)
        else:
            params[name] = trial.suggest_categorical(name, list(spec.choices))
    return params
