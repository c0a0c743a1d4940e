"""Classification: classifier zoo, one leak-free pipeline, Optuna tuning, evaluation, Table 1.

Submodules are imported where used (``bonemet.modeling.training`` for the train stage) so that
importing the package stays cheap.
"""
