"""PyRadiomics feature extraction: the only package that imports ``radiomics``."""

from bonemet.radiomics.extraction import (
    BadMaskError,
    CaseInput,
    CohortStats,
    FeatureNameMismatchError,
    cache_key,
    check_mask,
    expected_feature_names,
    extract_cohort,
    extract_features,
    plain_pyradiomics,
    resolve_n_jobs,
)
from bonemet.radiomics.settings import (
    RadiomicsSettingsError,
    build_settings,
    load_settings_file,
    settings_digest,
    settings_from_params,
)
from bonemet.radiomics.sources import SOURCES, MissingMaskError, extract_sources, source_cases

__all__ = [
    "BadMaskError",
    "CaseInput",
    "CohortStats",
    "FeatureNameMismatchError",
    "MissingMaskError",
    "SOURCES",
    "RadiomicsSettingsError",
    "build_settings",
    "cache_key",
    "check_mask",
    "extract_cohort",
    "expected_feature_names",
    "extract_features",
    "load_settings_file",
    "extract_sources",
    "plain_pyradiomics",
    "resolve_n_jobs",
    "source_cases",
    "settings_digest",
    "settings_from_params",
]
