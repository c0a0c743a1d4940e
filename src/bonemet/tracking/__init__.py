"""The tracker interface the library logs to; no tracking backend is imported here.

Library code receives a :class:`Tracker` and never imports mlflow. Tests pass
:class:`NullTracker` (or :class:`RecordingTracker` to assert what would be logged); the
command line passes :class:`bonemet.registry.store.MlflowTracker`, from the one package that
imports mlflow. Work done in another process logs into a :class:`CallBuffer`, replayed by
:func:`replay_calls`.
"""

from bonemet.tracking.base import (
    CallBuffer,
    DatasetInput,
    NullTracker,
    RecordingTracker,
    Tracker,
    finite_metrics,
    replay_calls,
)

__all__ = ["CallBuffer", "DatasetInput", "NullTracker", "RecordingTracker", "Tracker", "finite_metrics", "replay_calls"]
