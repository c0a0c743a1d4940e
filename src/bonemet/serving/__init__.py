"""Serving: input checks for feature rows, the promotion gate, and prediction from a CT."""

from bonemet.serving.checks import FeatureInputError, check_feature_frame
from bonemet.serving.gate import PromotionDecision, decide_promotion

__all__ = ["FeatureInputError", "PromotionDecision", "check_feature_frame", "decide_promotion"]
