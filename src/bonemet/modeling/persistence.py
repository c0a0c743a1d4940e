"""Saving and loading fitted pipelines with skops: one trust list for every reader.

skops refuses to load any type it is not told to trust. A bonemet pipeline holds only types
from the modules in :data:`TRUSTED_MODULES` (our transformers, scikit-learn, NumPy, SciPy,
XGBoost, LightGBM and a few builtins); anything else in a file is refused before it is loaded.
The train stage, the MLflow sklearn flavour and the served pyfunc all go through here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bonemet.errors import UserError
from bonemet.utils import atomic_path

#: Top-level modules whose types a saved pipeline may hold.
TRUSTED_MODULES: tuple[str, ...] = ("bonemet", "sklearn", "numpy", "scipy", "xgboost", "lightgbm", "builtins",
                                    "collections")


class UntrustedPipelineError(UserError, ValueError):
    """A pipeline file holds types outside :data:`TRUSTED_MODULES`."""


def checked_types(untrusted: Sequence[str], where: str) -> list[str]:
    """``untrusted`` when every type comes from a trusted module; otherwise raise naming them."""
    refused = [t for t in untrusted if t.split(".")[0] not in TRUSTED_MODULES]
    if refused:
        raise UntrustedPipelineError(
            f"{where}: refusing to load types outside {', '.join(TRUSTED_MODULES)}: {refused[:5]} "
            "(was it written by bonemet's train stage?)"
        )
    return list(untrusted)


def trusted_types(pipeline: Any) -> list[str]:
    """The types skops must be told to trust to load ``pipeline`` (checked against the list)."""
    import skops.io as sio

    return checked_types(sio.get_untrusted_types(data=sio.dumps(pipeline)), "pipeline")


def save_pipeline(pipeline: Any, path: str | Path) -> Path:
    """Write a fitted pipeline with skops, atomically."""
    import skops.io as sio

    path = Path(path)
    with atomic_path(path) as tmp:
        sio.dump(pipeline, tmp)
    return path


def load_pipeline(path: str | Path) -> Any:
    """Load a skops pipeline, trusting only types from :data:`TRUSTED_MODULES`.

    Raises:
        UntrustedPipelineError: the file holds other types.
    """
    import skops.io as sio

    return sio.load(str(path), trusted=checked_types(sio.get_untrusted_types(file=str(path)), f"model file {path}"))
