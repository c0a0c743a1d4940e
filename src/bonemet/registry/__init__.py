"""MLflow: the only package that imports it. Runs, the model registry, the served models.

* :mod:`~bonemet.registry.store`: the store's client (``client``), :class:`MlflowTracker`,
  versions and aliases: every call names its store and run (no global MLflow state).
* :mod:`~bonemet.registry.pyfunc`: the served classifier (an MLflow pyfunc).
* :mod:`~bonemet.registry.registration`: registering the train stage's best pipeline, with the
  promotion gate (:mod:`~bonemet.registry.gate`).
* :mod:`~bonemet.registry.loaders`: ``bonemet-classifier`` and ``bonemet-segmenter`` by alias.

Nothing below this package imports it: the library logs through
:class:`bonemet.tracking.Tracker`, and only the entry points (``bonemet.stages``) and the
benchmarks reach in here. Submodules are imported where used (mlflow is slow to import).
"""
