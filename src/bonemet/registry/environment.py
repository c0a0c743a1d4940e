"""The requirements logged with a registered model: what it imports, at the installed versions.

A registered model must load in a fresh virtual environment built only from its
``requirements.txt`` (``python -m venv`` + ``pip install -r``). Its own code travels with it
(the ``bonemet`` package as ``code_paths``: a handful of modules that need NumPy, pandas,
scikit-learn or torch, where a bonemet wheel would bring, or have to be installed without, the
forty dependencies of the whole pipeline). The requirements are the distributions of the
top-level modules the model imports: those its code needs (:data:`CLASSIFIER_IMPORTS`,
:data:`SEGMENTER_IMPORTS`) and those of the types in the fitted object (XGBoost, LightGBM...),
each pinned to the version installed here (``importlib.metadata``), local version labels
dropped (``torch==2.13.0`` for ``2.13.0+cpu``, which pip matches to the local wheel).
"""

from __future__ import annotations

import importlib.metadata as md
from collections.abc import Iterable
from typing import Any

#: Top-level modules the served classifier's code imports (bonemet.registry.pyfunc, the skops
#: loader, bonemet.modeling.calibration/reduction/domain, bonemet.selection).
CLASSIFIER_IMPORTS = ("mlflow", "numpy", "pandas", "scipy", "sklearn", "skops")
#: Top-level modules the segmentation network's code imports (bonemet.segmentation.missu).
SEGMENTER_IMPORTS = ("mlflow", "numpy", "torch")
#: Carried as code, never installed from an index.
_OWN = ("bonemet",)


def _public(version: str) -> str:
    return version.split("+", 1)[0]


def pinned_requirements(modules: Iterable[str]) -> list[str]:
    """``distribution==version`` for the distributions providing ``modules`` (top-level import
    names), sorted; our own package and the standard library are left out.

    Raises:
        LookupError: a module is imported but no installed distribution provides it.
    """
    import sys

    providers = md.packages_distributions()
    out: set[str] = set()
    for module in modules:
        top = module.split(".", 1)[0]
        if top in _OWN or top in sys.stdlib_module_names or top in sys.builtin_module_names:
            continue
        distributions = providers.get(top)
        if not distributions:
            raise LookupError(f"no installed distribution provides the module '{top}' that the model imports")
        for dist in distributions:
            out.add(f"{dist}=={_public(md.version(dist))}")
    return sorted(out, key=str.lower)


def object_modules(obj: Any) -> set[str]:
    """Top-level modules of the types in a fitted object's graph (estimators, their attributes,
    lists, tuples and dicts of them; arrays are not entered)."""
    import numpy as np

    found: set[str] = set()
    seen: set[int] = set()

    def walk(item: Any) -> None:
        if id(item) in seen or isinstance(item, str | bytes | int | float | bool | type(None) | np.ndarray):
            return
        seen.add(id(item))
        found.add(type(item).__module__.split(".", 1)[0])
        if isinstance(item, list | tuple | set):
            for sub in item:
                walk(sub)
        elif isinstance(item, dict):
            for sub in item.values():
                walk(sub)
        elif hasattr(item, "__dict__") and not isinstance(item, type):
            for sub in vars(item).values():
                walk(sub)

    walk(obj)
    return found


def classifier_requirements(pipeline: Any) -> list[str]:
    """Requirements of the served classifier wrapping ``pipeline``."""
    return pinned_requirements((*CLASSIFIER_IMPORTS, *object_modules(pipeline)))


def segmenter_requirements(network: Any) -> list[str]:
    """Requirements of a registered segmentation network (its module classes' packages included)."""
    modules = {type(m).__module__ for m in network.modules()} if hasattr(network, "modules") else set()
    return pinned_requirements((*SEGMENTER_IMPORTS, *modules))
