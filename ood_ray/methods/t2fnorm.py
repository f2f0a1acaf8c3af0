"""T2FNorm (Regmi, Panthi, Dotel, Gyawali, Stoyanov, Bhattarai, "T2FNorm: Extremely Simple Scaled
Train-time Feature Normalization for OOD Detection", 2023): features normalised during training only.

With penultimate features ``z`` and the linear class head ``W, b``, training minimises::

    CE(W · (z / ‖z‖₂) / τ + b, y)

so the head only ever sees features of norm 1/τ. At test time the normalisation is dropped and the
scaling kept: the logits are ``W · z / τ + b``, and the OOD score is their maximum softmax
probability (MSP). OOD inputs tend to have smaller feature norms than ID ones once the network has
been trained on the features' direction only, and the unnormalised test-time logits keep that
difference. This follows OpenOOD v1.5's ``T2FNormNet`` (its ``forward_ood_inference`` divides by τ
for networks trained from scratch) and its MSP postprocessor; CIFAR-10 ResNet-18 near/far AUROC
92.8/97.0 on its leaderboard, τ = 0.1.

Post-hoc detectors see the raw features ``z`` and, as the class head, the linear map the model
uses at test time (``nn.Linear`` with weight ``W/τ`` and bias ``b``), so every detector that needs a
linear head works. Pure torch; no Ray, MLflow or I/O.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Method, StepResult


class T2FNormHead(nn.Module):
    """A linear head on features normalised and divided by τ in training, divided by τ in eval."""

    def __init__(self, num_features: int, num_classes: int, tau: float):
        super().__init__()
        self.fc = nn.Linear(num_features, num_classes)
        self.tau = float(tau)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.training:
            z = F.normalize(z, dim=1)
        return self.fc(z / self.tau)

    def extra_repr(self) -> str:
        return f"tau={self.tau:g}"

    def test_time_linear(self) -> nn.Linear:
        """The head's test-time map as one frozen ``nn.Linear``: weight ``W/τ``, bias ``b``."""
        fc = self.fc
        out = nn.Linear(fc.in_features, fc.out_features, bias=fc.bias is not None, device=fc.weight.device, dtype=fc.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(fc.weight / self.tau)
            if fc.bias is not None:
                out.bias.copy_(fc.bias)
        return out.eval().requires_grad_(False)


class T2FNorm(Method):
    """Cross-entropy on normalised, τ-scaled features; scored by MSP of the unnormalised logits."""

    name = "t2fnorm"
    needs_outliers = False
    defaults: dict = {"tau": 0.1, "delta": 0.15}
    default_score = "msp"
    threshold_score = "msp"
    positive = ("tau",)
    labels = {"tau": "tau (τ)"}

    @classmethod
    def search_space(cls, trial) -> dict:
        """τ, log-uniform around the paper's 0.1: it changes training."""
        return {"tau": trial.suggest_float("tau", 0.01, 1.0, log=True)}

    def make_head(self, num_features: int, num_classes: int) -> nn.Module:
        return T2FNormHead(num_features, num_classes, float(self.params["tau"]))

    def class_head(self, head: nn.Module) -> nn.Module:
        return head.test_time_linear()

    def training_step(self, model, x, y, x_out, state) -> StepResult:
        return StepResult(F.cross_entropy(self.logits(model(x)), y))
