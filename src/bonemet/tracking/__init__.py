"""Experiment tracking behind one small interface; MLflow is imported only in `mlflow_backend`.

Library code receives a :class:`Tracker` and never imports mlflow. Tests pass
:class:`NullTracker` (or :class:`RecordingTracker` to assert what would be logged); the
command line passes :func:`bonemet.tracking.mlflow_backend.MlflowTracker`. Work done in another
process logs into a :class:`CallBuffer`, replayed by :func:`replay_calls`.
"""

from bonemet.tracking.base import CallBuffer, NullTracker, RecordingTracker, Tracker, replay_calls

__all__ = ["CallBuffer", "NullTracker", "RecordingTracker", "Tracker", "replay_calls"]
