"""PyRadiomics settings: the YAML parameter file merged with the params.yaml overrides.

The settings are a plain dict in PyRadiomics' parameter-file layout
(``{"imageType": ..., "featureClass": ..., "setting": ...}``) so that they can be hashed for
the per-case cache and handed unchanged to ``RadiomicsFeatureExtractor``.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from bonemet.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from bonemet.config import Params, RadiomicsSpec

SECTIONS = ("imageType", "featureClass", "setting")


class RadiomicsSettingsError(UserError, ValueError):
    """The PyRadiomics settings file is missing or malformed."""


def load_settings_file(path: str | Path) -> dict[str, Any]:
    """Read a PyRadiomics parameter file (YAML) into a dict with the three sections."""
    path = Path(path)
    if not path.is_file():
        raise RadiomicsSettingsError(f"{path}: PyRadiomics settings file not found (params radiomics.settings_file, "
                                     f"relative to the working directory: run the stage from the repository root)")
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


def build_settings(base: Mapping[str, Any], spec: RadiomicsSpec, *, label: int) -> dict[str, Any]:
    """The tunables of ``spec`` merged over a settings dict in PyRadiomics' layout.

    Args:
        base: settings from :func:`load_settings_file` (image types, feature classes, fixed settings).
        spec: the ``radiomics`` params: bin width (HU for CT), resampling spacing (x, y, z) in mm
            (empty: none), interpolator (a SimpleITK name such as ``sitkBSpline``), normalisation.
        label: value of the lesion in the mask files (``data.mask_label``).
    """
    settings = {key: copy.deepcopy(dict(base.get(key) or {})) for key in SECTIONS}
    setting = settings["setting"]
    setting["binWidth"] = float(spec.bin_width)
    setting["resampledPixelSpacing"] = [float(s) for s in spec.resampled_spacing_mm] or None
    setting["interpolator"] = str(spec.interpolator)
    setting["normalize"] = bool(spec.normalize)
    setting["label"] = int(label)
    setting["additionalInfo"] = False  # diagnostics are never features
    return settings


def settings_from_params(params: Params) -> dict[str, Any]:
    """The PyRadiomics settings of a project: ``radiomics.settings_file`` with the ``radiomics``
    params over it and ``data.mask_label`` as the lesion label (extract and predict use this)."""
    return build_settings(load_settings_file(params.radiomics.settings_file), params.radiomics,
                          label=params.data.mask_label)


def settings_digest(settings: Mapping[str, Any]) -> str:
    """A stable SHA-256 of the settings (canonical JSON) plus the PyRadiomics version."""
    import radiomics

    payload = json.dumps({"settings": settings, "pyradiomics": radiomics.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()

