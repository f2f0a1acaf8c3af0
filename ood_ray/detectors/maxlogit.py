"""MaxLogit (Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World Settings",
ICML 2022): the largest logit, ``max_c logits_c``."""

from __future__ import annotations

import torch

from .base import Detector


class MaxLogit(Detector):
    name = "maxlogit"

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits(x).to(torch.float64).amax(dim=1)
