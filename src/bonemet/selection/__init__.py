"""Feature selection as scikit-learn transformers: ICC filter, redundancy filter, LASSO."""

from bonemet.selection.filters import CorrelationFilter
from bonemet.selection.icc import ICCFilter, PairingError, icc
from bonemet.selection.lasso import LassoSelector

__all__ = ["CorrelationFilter", "ICCFilter", "LassoSelector", "PairingError", "icc"]
