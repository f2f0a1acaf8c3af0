"""SCALE (Xu, Lian, Chen, Li, "Scaling for Training Time and Post-hoc Out-of-distribution
Detection Enhancement", ICLR 2024).

Per sample: s1 = Σ z, s2 = Σ of the k = D − round(D·p/100) largest activations (as ASH);
z' = z · exp(s1/s2), nothing pruned; score = logsumexp(W·z' + b), the energy of the scaled features.
"""

from __future__ import annotations

import torch

from .ash import PercentileShaping, shape_ratio
from .base import energy


class Scale(PercentileShaping):
    name = "scale"
    defaults = {"percentile": 85.0}

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        z = x.to(torch.float64)
        _, _, ratio = shape_ratio(z, self.params["percentile"])
        return energy(self._linear(z * torch.exp(ratio).unsqueeze(1)))
