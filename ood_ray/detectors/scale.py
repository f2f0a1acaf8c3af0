"""SCALE (Xu, Lian, Chen, Li, "Scaling for Training Time and Post-hoc Out-of-distribution
Detection Enhancement", ICLR 2024).

Per sample: s1 = Σ z, s2 = Σ of the k = D − round(D·p/100) largest activations (as ASH);
z' = z · exp(s1/s2), nothing pruned; score = logsumexp(W·z' + b), the energy of the scaled features.
"""

from __future__ import annotations

import torch

from .ash import shape_ratio
from .base import Detector, energy


class Scale(Detector):
    name = "scale"
    defaults = {"percentile": 85.0}
    needs_linear_head = True
    grid_values = {"percentile": [65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0]}

    @classmethod
    def validate(cls, params: dict) -> None:
        if not 0 <= params["percentile"] < 100:
            raise cls.bad("percentile", params["percentile"], "must lie in [0, 100)")

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        z = x.to(torch.float64)
        _, _, ratio = shape_ratio(z, self.params["percentile"])
        return energy(self._linear(z * torch.exp(ratio).unsqueeze(1)))
