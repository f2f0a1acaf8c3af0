"""``EpochLogger``: a Ray Train callback, run in the Train controller, that logs each epoch's report
of one training run (``ood-ray train``) to its MLflow run. Kept small: the controller imports it."""

from __future__ import annotations

from mlflow.tracking import MlflowClient
from ray.train import UserCallback

from .store import log_metrics


class EpochLogger(UserCallback):
    """Ray Train callback (runs in the controller): logs each epoch's report to an MLflow run."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = tracking_uri
        self.run_id = run_id

    def after_report(self, run_context, metrics, checkpoint):
        if not metrics:
            return
        m = metrics[0]
        log_metrics(MlflowClient(self.tracking_uri), self.run_id, m, step=int(m.get("epoch", 0)))
