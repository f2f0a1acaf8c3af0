"""The softmax baseline: a linear head trained with cross-entropy, scored by MSP."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .base import Method, StepResult


class Softmax(Method):
    name = "softmax"
    needs_outliers = False
    defaults: dict = {"delta": 0.15}  # abstain below max-softmax 0.15
    default_score = "msp"

    def make_head(self, num_features: int, num_classes: int) -> nn.Module:
        return nn.Linear(num_features, num_classes)

    def training_step(self, model, x, y, x_out, state) -> StepResult:
        logits = self.logits(model(x))
        return StepResult(F.cross_entropy(logits, y))
