"""Classification: classifier zoo, one leak-free pipeline, Optuna tuning, evaluation, Table 1.

Submodules are imported where used (``bonemet.modeling.training`` for the train stage) so that
importing the package stays cheap.
"""

#: The train stage's record of its MLflow runs (``<train.metrics_dir>/train_runs.json``: the parent run
#: and each model's run): external state, outside the models folder that DVC caches, which holds only
#: what the same code, data and params reproduce byte for byte.
TRAIN_RUNS_FILE = "train_runs.json"
#: the train stage's Table 1 (markdown) in ``train.metrics_dir``
TABLE1_MD = "table1.md"
#: the evaluate stage's outputs in ``evaluate.out_dir``
REPEATED_FILE, REPEATED_TABLE, SUMMARY_FILE = "repeated.json", "repeated.csv", "summary.json"
