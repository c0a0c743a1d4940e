"""Lesion segmentation: networks (MISSU and MONAI baselines), training, sliding-window inference.

Kept light: import the submodules you need (``bonemet.segmentation.networks`` imports torch).
"""
