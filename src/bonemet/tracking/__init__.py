"""Experiment tracking behind one small interface; MLflow is imported only in `mlflow_backend`.

Library code receives a :class:`Tracker` and never imports mlflow. Tests pass
:class:`NullTracker` (or :class:`RecordingTracker` to assert what would be logged); the
command line passes :func:`bonemet.tracking.mlflow_backend.MlflowTracker`.
"""

from bonemet.tracking.base import NullTracker, RecordingTracker, Tracker

__all__ = ["NullTracker", "RecordingTracker", "Tracker"]
