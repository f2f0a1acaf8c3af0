"""GEN, generalized entropy (Liu, Lochman, Zach, "GEN: Pushing the Limits of Softmax-Based
Out-of-Distribution Detection", CVPR 2023).

With p = softmax(logits) sorted in decreasing order, the score is ``−Σ_{i≤M} p_i^γ (1 − p_i)^γ``
over the M largest probabilities (as OpenOOD's ``GENPostprocessor``); M = ``top_m`` is capped at
the number of classes K.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Detector


class GEN(Detector):
    name = "gen"
    defaults = {"gamma": 0.1, "top_m": 100}
    grid_values = {"gamma": [0.01, 0.05, 0.1, 0.5], "top_m": [10, 50, 100]}

    @classmethod
    def validate(cls, params: dict) -> None:
        if params["gamma"] <= 0:
            raise cls.bad("gamma", params["gamma"], "must be > 0")
        if params["top_m"] < 1:
            raise cls.bad("top_m", params["top_m"], "must be >= 1")

    @classmethod
    def _grid_point(cls, point: dict[str, Any], feature_dim, num_classes, num_train) -> dict[str, Any]:
        if num_classes is not None:
            point["top_m"] = min(point["top_m"], num_classes)
        return point

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self._logits(x).to(torch.float64), dim=1)
        m = min(self.params["top_m"], probs.shape[1])
        top = probs.topk(m, dim=1).values
        g = self.params["gamma"]
        return -(top.pow(g) * (1.0 - top).pow(g)).sum(dim=1)
