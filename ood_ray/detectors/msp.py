"""MSP, maximum softmax probability (Hendrycks & Gimpel, ICLR 2017): ``max_c softmax(logits)_c``."""

from __future__ import annotations

import torch

from .base import Detector


class MSP(Detector):
    name = "msp"

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self._logits(x).to(torch.float64), dim=1).amax(dim=1)
