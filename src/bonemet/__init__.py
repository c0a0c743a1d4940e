"""bonemet: breast-cancer vs other-origin bone metastases on CT.

A library for the whole study (Zhao et al., J Bone Oncol 2024): cohort I/O and validation,
preprocessing, MISSU segmentation, PyRadiomics features, ICC/LASSO selection, tuned
classifiers, evaluation, and an MLflow registry. It imports and runs without DVC or a
tracking server; the `bonemet` command and the DVC stages are thin entry points over it.
"""

__version__ = "0.1.0"

