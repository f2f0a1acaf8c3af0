"""``EpochLogger``: a Ray Train callback, run in the Train controller, that logs each epoch's report
of one training run (``ood-ray train``) to its MLflow run. Kept small: the controller imports it."""

from __future__ import annotations

from mlflow.tracking import MlflowClient
from ray.train import UserCallback

from .store import log_metrics, set_tag


class EpochLogger(UserCallback):
    """Ray Train callback (runs in the controller): logs each epoch's report to an MLflow run."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = tracking_uri
        self.run_id = run_id

    def after_report(self, run_context, metrics, checkpoint):
        if not metrics:
            return
        m = metrics[0]
        client = MlflowClient(self.tracking_uri)
        log_metrics(client, self.run_id, m, step=int(m.get("epoch", 0)))
        if isinstance(m.get("ood_ray.detector"), str):  # the post-hoc detector chosen after the last epoch
            set_tag(client, self.run_id, "ood_ray.detector", m["ood_ray.detector"])
