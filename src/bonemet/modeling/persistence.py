"""Saving and loading fitted pipelines with skops: one trust list for every reader.

skops refuses to load any type it is not told to trust. A bonemet pipeline holds only types
from the modules in :data:`TRUSTED_MODULES` (our transformers, scikit-learn, NumPy, SciPy,
XGBoost, LightGBM and a few builtins); anything else in a file is refused before it is loaded.
The train stage, the MLflow sklearn flavour and the served pyfunc all go through here.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import sys
from collections.abc import Iterator, Sequence
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


#: scikit-learn's vendored array-API shim for torch: ``import skops.io`` imports it, and torch with it.
_TORCH_SHIM = "sklearn.externals.array_api_compat.torch"


class _RefuseModule(importlib.abc.MetaPathFinder):
    """An import finder that makes one module's import fail (ImportError)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> None:
        if fullname == self.name:
            raise ImportError(f"{fullname} is not needed to read skops files")
        return None


@contextlib.contextmanager
def _without_torch_shim() -> Iterator[None]:
    """While skops is imported, scikit-learn's torch shim cannot be (when torch is not loaded yet).

    At import, skops lists scikit-learn's estimators for its *default* trust list
    (``sklearn.utils.all_estimators``), walking every scikit-learn package with ``pkgutil``,
    which imports each package it walks into, ``sklearn.externals.array_api_compat.torch``
    too: with torch installed that imports torch (1.2 s, and 0.4 s more at exit) into a process
    that reads a classifier. The walk skips a package whose import fails, and ``all_estimators``
    ignores everything under ``externals`` anyway, so skops's lists are the same; bonemet passes
    its own trust list regardless. Nothing stays changed: the finder is removed afterwards and the
    shim imports normally later if anything asks for it.
    """
    if "torch" in sys.modules or "skops.io" in sys.modules:
        yield
        return
    finder = _RefuseModule(_TORCH_SHIM)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


def _skops_io() -> Any:
    """``skops.io``, imported without pulling in torch (see :func:`_without_torch_shim`)."""
    with _without_torch_shim():
        import skops.io as sio
    return sio


def trusted_types(pipeline: Any) -> list[str]:
    """The types skops must be told to trust to load ``pipeline`` (checked against the list)."""
    sio = _skops_io()

    return checked_types(sio.get_untrusted_types(data=sio.dumps(pipeline)), "pipeline")


def save_pipeline(pipeline: Any, path: str | Path) -> Path:
    """Write a fitted pipeline with skops, atomically; the same pipeline gives the same bytes, so a
    rerun reproduces the train stage's outputs exactly (see :func:`canonical_skops`)."""
    sio = _skops_io()

    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(canonical_skops(sio.dumps(pipeline)))
    return path


def canonical_skops(data: bytes) -> bytes:
    """A skops archive made byte-reproducible: skops keys its objects by their memory addresses
    (``"__id__": 140211369077184``, ``140211369146384.npy``) and dates its zip entries; here the ids
    are renumbered 1, 2, ... in order of first appearance and every entry is dated 1980-01-01."""
    import io
    import re
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as source:
        schema = source.read("schema.json").decode("utf-8")
        ids: dict[str, str] = {}
        for match in re.finditer(r'"__id__": (\d+)|"(\d+)\.npy"', schema):
            ids.setdefault(match.group(1) or match.group(2), str(len(ids) + 1))
        schema = re.sub(r'("__id__": )(\d+)', lambda m: m.group(1) + ids.get(m.group(2), m.group(2)), schema)
        schema = re.sub(r'"(\d+)\.npy"', lambda m: f'"{ids.get(m.group(1), m.group(1))}.npy"', schema)
        entries = {"schema.json": schema.encode("utf-8")}
        for info in source.infolist():
            if info.filename != "schema.json":
                stem = info.filename.removesuffix(".npy")
                entries[f"{ids.get(stem, stem)}.npy" if info.filename.endswith(".npy") else info.filename] = \
                    source.read(info)
        compress = source.infolist()[0].compress_type
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = compress
            target.writestr(info, entries[name])
    return out.getvalue()


def load_pipeline(path: str | Path) -> Any:
    """Load a skops pipeline, trusting only types from :data:`TRUSTED_MODULES`.

    Raises:
        UntrustedPipelineError: the file holds other types.
    """
    sio = _skops_io()

    return sio.load(str(path), trusted=checked_types(sio.get_untrusted_types(file=str(path)), f"model file {path}"))
