"""Loading `params.yaml`: the only place the entry points read tunables from.

The library itself never reads params, argv or the environment: entry points call
:func:`load_params` and pass explicit arguments on.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PARAMS = Path("params.yaml")


class ParamsError(ValueError):
    """A params file is missing, unreadable or lacks a required key."""


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """Read a params YAML file into a plain dict."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path} (run from the repository root or pass --params)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ParamsError(f"params file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ParamsError(f"params file {path} must hold a mapping at the top level")
    return data


def get(params: Mapping[str, Any], dotted_key: str, default: Any = ...) -> Any:
    """Look up ``"section.sub.key"`` in nested params; raise ParamsError naming the key if absent."""
    node: Any = params
    for part in dotted_key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            if default is not ...:
                return default
            raise ParamsError(f"params key '{dotted_key}' is missing (no '{part}')")
        node = node[part]
    return node


def section(params: Mapping[str, Any], name: str) -> dict[str, Any]:
    """One top-level section of params as a dict (ParamsError if missing)."""
    value = get(params, name)
    if not isinstance(value, Mapping):
        raise ParamsError(f"params section '{name}' must be a mapping, found {type(value).__name__}")
    return dict(value)


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge ``override`` into a copy of ``base`` (used for params profiles)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out
