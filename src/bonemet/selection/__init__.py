"""Feature selection as scikit-learn transformers: ComBat harmonisation, ICC filter, redundancy filter, LASSO."""

from bonemet.selection.filters import CorrelationFilter
from bonemet.selection.harmonize import ComBatHarmonizer, SiteError
from bonemet.selection.icc import ICCFilter, PairingError, icc
from bonemet.selection.lasso import LassoSelector

__all__ = ["ComBatHarmonizer", "CorrelationFilter", "ICCFilter", "LassoSelector", "PairingError", "SiteError", "icc"]
