"""The loop in this process, without Ray: for tests, benchmarks and quick single-process runs."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import torch

from ..config import TrainConfig
from .loop import train_loop


class LocalWorker:
    """The same loop in this process, without Ray: world 1, checkpoints under ``root``.

    For benchmarks (``bench/tune_overhead.py`` runs trials through plain Optuna with it) and for
    tests that need a single-process reference run.
    """

    def __init__(self, root: str | Path, device: str | torch.device = "cpu"):
        self.rank, self.world, self.device = 0, 1, torch.device(device)
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.reports: list[dict] = []
        self.checkpoint: str | None = None

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    @contextlib.contextmanager
    def resume_from(self):
        yield self.checkpoint, self.checkpoint

    def stop_requested(self) -> bool:
        return False

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        if checkpoint_dir:
            dest = self.root / f"checkpoint_{len(self.reports):06d}"
            shutil.copytree(checkpoint_dir, dest)
            self.checkpoint = str(dest)
            metrics = {**metrics, "checkpoint_path": self.checkpoint}
        self.reports.append(metrics)


def train_local(cfg: TrainConfig, root: str | Path, device: str = "cpu") -> list[dict]:
    """Train ``cfg`` in this process with one worker and no Ray; returns every epoch's metrics."""
    worker = LocalWorker(root, device)
    train_loop(cfg.validate(), worker)
    return worker.reports
