"""Mahalanobis distance (Lee, Lee, Lee, Shin, NeurIPS 2018), without input preprocessing or the
feature ensemble (OpenOOD's ``mds``).

Class means μ_c of the train features, one shared covariance Σ = mean over samples of
(z − μ_y)(z − μ_y)ᵀ (maximum likelihood, divided by N), precision P = pinv(Σ) (Hermitian
pseudo-inverse, in float64); score = max_c −(z − μ_c)ᵀ P (z − μ_c). Every class of the head needs
at least one training sample.
"""

from __future__ import annotations

import torch

from .base import Detector


class Mahalanobis(Detector):
    name = "mahalanobis"
    state_keys = {"means": ("K", "D"), "precision": ("D", "D")}

    def _fit(self, z: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        n, k = z.shape[0], self.num_classes
        if n < 2:
            raise self.error(f"needs at least 2 training samples for a covariance, got N={n}")
        counts = torch.bincount(y, minlength=k)
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            raise self.error(f"classes with no training sample: {empty} (the head has K={k} classes)")
        z64 = z.to(torch.float64)
        means = torch.zeros(k, z.shape[1], dtype=torch.float64, device=z.device).index_add_(0, y, z64)
        means /= counts.to(torch.float64).unsqueeze(1)
        centered = z64 - means[y]
        cov = centered.T @ centered / n
        return {"means": means, "precision": torch.linalg.pinv(cov, hermitian=True)}

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        means, prec = self._stat("means", x.device), self._stat("precision", x.device)
        z = x.to(torch.float64)
        zp = z @ prec
        # (z − μ)ᵀP(z − μ) = zᵀPz − 2 zᵀPμ + μᵀPμ for every class at once (P is symmetric)
        quad = (zp * z).sum(1, keepdim=True) - 2.0 * zp @ means.T + ((means @ prec) * means).sum(1)
        return (-quad).amax(dim=1)
