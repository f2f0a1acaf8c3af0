"""ReAct, rectified activations (Sun, Guo, Li, "ReAct: Out-of-distribution Detection With
Rectified Activations", NeurIPS 2021).

c = the ``percentile``-th percentile of all train feature activations (flattened, linear
interpolation as ``numpy.percentile``); score = logsumexp(W·min(z, c) + b), the energy of the
clipped features. OpenOOD takes c from the ID validation split; here it comes from the features
``fit`` gets (the train split).
"""

from __future__ import annotations

import torch

from .base import Detector, energy, percentile


class ReAct(Detector):
    name = "react"
    defaults = {"percentile": 90.0}
    needs_linear_head = True
    grid_values = {"percentile": [85.0, 90.0, 95.0, 99.0]}
    state_keys = {"threshold": ()}
    fit_params = ("percentile",)

    @classmethod
    def validate(cls, params: dict) -> None:
        if not 0 < params["percentile"] <= 100:
            raise cls.bad("percentile", params["percentile"], "must lie in (0, 100]")

    def _fit(self, z: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"threshold": percentile(z, self.params["percentile"])}

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        clipped = torch.minimum(x.to(torch.float64), self._stat("threshold", x.device))
        return energy(self._linear(clipped))
