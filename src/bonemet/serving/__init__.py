"""Serving without a tracking backend: input checks for feature rows and prediction from a CT.

The models arrive as objects (see :mod:`bonemet.serving.predict`); loading them from the
MLflow registry is :mod:`bonemet.registry.loaders`' job.
"""

from bonemet.serving.checks import FeatureInputError, check_feature_frame

__all__ = ["FeatureInputError", "check_feature_frame"]
