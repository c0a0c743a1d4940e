"""The planned settings' values the tests run with (params.yaml leaves them ``auto`` to the plan
stage; a test of a library function needs values): the speed benchmarks' reference values, close
to what the plan gives the default cohort on the cpu profile (1.51 mm, 32^3); the plan itself is
tested in tests/test_planning.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def _reference_plan() -> dict[str, Any]:
    """benchmarks/_common.py's REFERENCE_PLAN: one copy of the values, which the speed benchmarks use too."""
    import importlib.util
    import sys

    name = "benchmarks_common"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_PARAMS.parent / "benchmarks" / "_common.py")
        module = sys.modules[name] = importlib.util.module_from_spec(spec)  # its dataclasses look it up
        spec.loader.exec_module(module)
    return dict(sys.modules[name].REFERENCE_PLAN)


#: planned key -> the value tests use
VALUES: dict[str, Any] = _reference_plan()


def with_values(params: Any) -> Any:
    """``params`` (validated specs) with the test values for every planned setting still ``auto``."""
    from bonemet.config import AUTO, setting
    from bonemet.planning.resolve import apply_values

    return apply_values(params, {k: v for k, v in VALUES.items() if setting(params, k) == AUTO})


def load(path: str | Path = REPO_PARAMS, **kwargs: Any) -> Any:
    """``load_specs(path)`` with the test values for the planned settings left ``auto``."""
    from bonemet.config import load_specs

    return with_values(load_specs(path, **kwargs))


def explicit_overrides() -> dict[str, Any]:
    """The test values as a nested params mapping (for a params file: the stages then need no plan),
    segment keys in every profile too (the profiles set them ``auto``)."""
    from bonemet.config import load_params

    profiles = list(load_params(REPO_PARAMS)["segment"]["profiles"])
    out: dict[str, Any] = {}
    for key, value in VALUES.items():
        paths = [key.split(".")]
        if key.startswith("segment."):
            paths += [["segment", "profiles", name, *key.split(".")[1:]] for name in profiles]
        for path in paths:
            node = out
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
    return out
