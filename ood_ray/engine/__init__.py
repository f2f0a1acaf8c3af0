"""The Ray-free training engine: build a run, train it, evaluate it, choose its post-hoc values.

``train_loop`` is the one loop every path runs (Ray Train workers, one-worker Tune trials, this
process); ``train_local`` runs it here without Ray. Nothing in this package imports Ray or MLflow.
"""

from .local import LocalWorker, train_local
from .loop import Worker, train_loop, train_step

__all__ = ["LocalWorker", "Worker", "train_local", "train_loop", "train_step"]
