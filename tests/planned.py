"""The planned settings' values the tests run with (params.yaml leaves them ``auto`` to the plan
stage; a test of a library function needs values). Close to what the plan gives the default
cohort on the cpu profile (data/plan.json: 1.51 mm, 32^3); the plan itself is tested in
tests/test_planning.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"

#: planned key -> the value tests use
VALUES: dict[str, Any] = {
    "preprocess.target_spacing_mm": [1.5, 1.5, 1.5],
    "preprocess.hu_window": [-200.0, 1800.0],
    "segment.roi_size": [32, 32, 32],
    "preprocess.crop.min_size_vox": [32, 32, 32],
    "segment.train.batch_size": 2,
}


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
