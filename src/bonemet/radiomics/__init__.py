"""PyRadiomics feature extraction: the only package that imports ``radiomics``."""

from bonemet.radiomics.extraction import (
    BadMaskError,
    CaseInput,
    CohortStats,
    FeatureNameMismatchError,
    cache_key,
    check_mask,
    extract_cohort,
    extract_features,
    resolve_n_jobs,
)
from bonemet.radiomics.settings import RadiomicsSettingsError, build_settings, load_settings_file, settings_digest

__all__ = [
    "BadMaskError",
    "CaseInput",
    "CohortStats",
    "FeatureNameMismatchError",
    "RadiomicsSettingsError",
    "build_settings",
    "cache_key",
    "check_mask",
    "extract_cohort",
    "extract_features",
    "load_settings_file",
    "resolve_n_jobs",
    "settings_digest",
]
