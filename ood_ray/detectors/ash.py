"""ASH-S, activation shaping with scaling (Djurisic, Bozanic, Ashok, Liu, "Extremely Simple
Activation Shaping for Out-of-Distribution Detection", ICLR 2023).

Per sample: s1 = Σ z; keep the k = D − round(D·p/100) largest activations (at least 1, as OpenOOD's
``topk``) and zero the rest; s2 = Σ kept; z' = kept · exp(s1/s2); score = logsumexp(W·z' + b).
Meant for non-negative (post-ReLU) features; a sample whose kept sum is 0 gets the factor exp(0).
"""

from __future__ import annotations

import torch

from .base import Detector, energy, top_count


def shape_ratio(z: torch.Tensor, percentile: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top-k values, their indices, s1/s2) per row of float64 features ``z``."""
    values, index = z.topk(top_count(z.shape[1], percentile), dim=1)
    total, kept = z.sum(dim=1), values.sum(dim=1)
    ratio = torch.where(kept != 0, total / torch.where(kept != 0, kept, 1.0), 0.0)
    return values, index, ratio


class PercentileShaping(Detector):
    """What ASH and SCALE share: a linear head, and the ``percentile`` that sets the top-k kept."""

    needs_linear_head = True
    grid_values = {"percentile": [65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0]}

    @classmethod
    def validate(cls, params: dict) -> None:
        if not 0 <= params["percentile"] < 100:
            raise cls.bad("percentile", params["percentile"], "must lie in [0, 100)")


class ASH(PercentileShaping):
    name = "ash"
    defaults = {"percentile": 90.0}

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        z = x.to(torch.float64)
        values, index, ratio = shape_ratio(z, self.params["percentile"])
        shaped = torch.zeros_like(z).scatter_(1, index, values) * torch.exp(ratio).unsqueeze(1)
        return energy(self._linear(shaped))
