"""PyRadiomics settings: the YAML parameter file merged with the params.yaml overrides.

The settings are a plain dict in PyRadiomics' parameter-file layout
(``{"imageType": ..., "featureClass": ..., "setting": ...}``) so that they can be hashed for
the per-case cache and handed unchanged to ``RadiomicsFeatureExtractor``.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

SECTIONS = ("imageType", "featureClass", "setting")


class RadiomicsSettingsError(ValueError):
    """The PyRadiomics settings file is missing or malformed."""


def load_settings_file(path: str | Path) -> dict[str, Any]:
    """Read a PyRadiomics parameter file (YAML) into a dict with the three sections."""
    path = Path(path)
    if not path.is_file():
        raise RadiomicsSettingsError(f"{path}: PyRadiomics settings file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise RadiomicsSettingsError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise RadiomicsSettingsError(f"{path}: expected a mapping with {', '.join(SECTIONS)}, found {type(data).__name__}")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise RadiomicsSettingsError(f"{path}: unknown section(s) {', '.join(unknown)}; expected {', '.join(SECTIONS)}")
    return {key: copy.deepcopy(data.get(key) or {}) for key in SECTIONS}


def build_settings(
    base: Mapping[str, Any],
    *,
    bin_width: float | None = None,
    resampled_spacing_mm: Sequence[float] | None = None,
    interpolator: str | None = None,
    normalize: bool | None = None,
    label: int | None = None,
) -> dict[str, Any]:
    """Merge the tunables from params.yaml over a settings dict (``None`` keeps the file's value).

    Args:
        base: settings in PyRadiomics' layout (from :func:`load_settings_file`).
        bin_width: grey-level bin width in image units (HU for CT).
        resampled_spacing_mm: isotropic or per-axis spacing (x, y, z) in mm; an empty list
            disables resampling.
        interpolator: SimpleITK interpolator name, e.g. ``sitkBSpline``.
        normalize: z-score the image before extraction (False keeps HU).
        label: value of the lesion in the mask files.
    """
    settings = {key: copy.deepcopy(dict(base.get(key) or {})) for key in SECTIONS}
    setting = settings["setting"]
    if bin_width is not None:
        if bin_width <= 0:
            raise RadiomicsSettingsError(f"bin_width must be > 0, found {bin_width}")
        setting["binWidth"] = float(bin_width)
    if resampled_spacing_mm is not None:
        spacing = [float(s) for s in resampled_spacing_mm] or None
        if spacing is not None and (len(spacing) != 3 or min(spacing) <= 0):
            raise RadiomicsSettingsError(f"resampled_spacing_mm must be 3 positive values in mm, found {resampled_spacing_mm}")
        setting["resampledPixelSpacing"] = spacing
    if interpolator is not None:
        setting["interpolator"] = str(interpolator)
    if normalize is not None:
        setting["normalize"] = bool(normalize)
    if label is not None:
        setting["label"] = int(label)
    setting["additionalInfo"] = False  # diagnostics are never features
    return settings


def settings_digest(settings: Mapping[str, Any]) -> str:
    """A stable SHA-256 of the settings (canonical JSON) plus the PyRadiomics version."""
    import radiomics

    payload = json.dumps({"settings": settings, "pyradiomics": radiomics.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()

