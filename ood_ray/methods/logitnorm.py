"""LogitNorm (Wei, Xie, Cheng, Feng, An, Li, ICML 2022): cross-entropy on normalized logits.

Cross-entropy keeps lowering its loss by growing the logits' norm, which makes the softmax
over-confident on in- and out-of-distribution inputs alike. LogitNorm trains on the logits' direction
only: with class logits ``z``::

    loss = CE(z / (τ · (‖z‖₂ + 1e-7)), y)

The temperature τ (``tau``) sets the scale of the normalized logits (1/τ); the paper uses
τ = 0.04 on CIFAR-10 and picks it from a small grid on validation data. At test time the model
is used as trained, without the normalization: the OOD score is the maximum softmax probability
of the raw logits (MSP), as in the paper and OpenOOD v1.5 (CIFAR-10 near/far AUROC 92.33/96.74
with a ResNet-18). Pure torch; no Ray, MLflow or I/O.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Method, StepResult

NORM_EPS = 1e-7


def logitnorm_loss(logits: torch.Tensor, targets: torch.Tensor, tau: float) -> torch.Tensor:
    """Cross-entropy of ``logits / (tau · (‖logits‖₂ + 1e-7))`` (norms per sample, over classes)."""
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau!r}")
    norms = torch.linalg.vector_norm(logits.float(), dim=1, keepdim=True) + NORM_EPS
    return F.cross_entropy(logits.float() / (norms * tau), targets)


class LogitNorm(Method):
    """A linear head trained with LogitNorm; scored (and thresholded) by MSP on the raw logits."""

    name = "logitnorm"
    needs_outliers = False
    defaults: dict = {"tau": 0.04, "delta": 0.15}
    default_score = "msp"
    threshold_score = "msp"
    positive = ("tau",)
    labels = {"tau": "tau (τ)"}

    @classmethod
    def search_space(cls, trial) -> dict:
        """τ, log-uniform around the paper's 0.04: it changes training."""
        return {"tau": trial.suggest_float("tau", 0.005, 0.5, log=True)}

    def make_head(self, num_features: int, num_classes: int) -> nn.Module:
        return nn.Linear(num_features, num_classes)

    def training_step(self, model, x, y, x_out, state) -> StepResult:
        return StepResult(logitnorm_loss(self.logits(model(x)), y, float(self.params["tau"])))
