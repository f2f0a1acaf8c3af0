"""Energy score (Liu, Wang, Owens, Li, NeurIPS 2020): the negative free energy
``T·logsumexp(logits / T)`` (higher = ID); the paper uses T = 1."""

from __future__ import annotations

import torch

from .base import Detector


class Energy(Detector):
    name = "energy"
    defaults = {"temperature": 1.0}

    @classmethod
    def validate(cls, params: dict) -> None:
        if params["temperature"] <= 0:
            raise cls.bad("temperature", params["temperature"], "must be > 0")

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        t = self.params["temperature"]
        return t * torch.logsumexp(self._logits(x).to(torch.float64) / t, dim=1)
