"""MLflow: the store (``store``) and the recorders of Ray's reports (``epochs.EpochLogger`` for a
training run, ``recorder.SweepRecorder`` for a sweep).

Only driver-side processes write to MLflow. ``from ood_ray import tracking`` gives the store API;
``tracking.epochs`` and ``tracking.recorder`` import Ray and are imported where they are needed.
"""

from ..config import TrackingError
from .liveness import close_dead_runs, open_run
from .store import (
    artifact_root,
    browse_hint,
    check_server,
    check_tracking,
    ensure_experiment,
    is_unreachable,
    log_metrics,
    log_pytorch_model,
    params_of,
    set_tag,
    sqlite_file,
    ui_url,
)

__all__ = [
    "TrackingError",
    "artifact_root",
    "browse_hint",
    "check_server",
    "check_tracking",
    "close_dead_runs",
    "ensure_experiment",
    "is_unreachable",
    "log_metrics",
    "log_pytorch_model",
    "open_run",
    "params_of",
    "set_tag",
    "sqlite_file",
    "ui_url",
]
