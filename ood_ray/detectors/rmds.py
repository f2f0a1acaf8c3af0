"""Relative Mahalanobis distance (Ren, Fort, Liu, Roy, Padhy, Lakshminarayanan, "A Simple Fix to
Mahalanobis Distance for Improving Near-OOD Detection", arXiv 2106.09022, 2021; OpenOOD's ``rmds``).

Class means μ_c and one shared covariance Σ exactly as ``mahalanobis``: Σ = mean over samples of
(z − μ_y)(z − μ_y)ᵀ (maximum likelihood, divided by N), precision P = pinv(Σ) (Hermitian
pseudo-inverse, float64). Besides, one class-agnostic "background" Gaussian of all train
features: μ_0 = their mean, Σ_0 = mean of (z − μ_0)(z − μ_0)ᵀ (also divided by N), P_0 = pinv(Σ_0).
With MD_c(z) = (z − μ_c)ᵀ P (z − μ_c) and MD_0(z) = (z − μ_0)ᵀ P_0 (z − μ_0):

    score = max_c −(MD_c(z) − MD_0(z)) = MD_0(z) − min_c MD_c(z)      (higher = ID)

i.e. the paper's confidence −min_c RMD_c. Every class of the head needs a training sample.

Other implementations:

- OpenOOD v1.5 (``RMDSPostprocessor``) fits both Gaussians with scikit-learn's
  ``EmpiricalCovariance`` (biased, divided by N, precision by ``pinvh``) on float32 features: the
  same estimator as here, computed in float32 where we use float64.
- pytorch-ood 0.4.0 (``RMD``) uses the scatter matrices *without* dividing by N (for the class
  covariance and the background one), adds a ridge 1e-6·I and inverts with ``inv``; its score is
  an outlier score min_c (d_c − d_0). Both precisions are N times smaller than ours, so its score
  is −1/N times this one up to the ridge (same ranking; ``tests/test_detectors_new.py`` shows it).
  We follow the paper and OpenOOD: maximum-likelihood covariances, no ridge, pseudo-inverse
  (so a constant feature, e.g. a unit that ReLU keeps at 0, is handled, not regularised).
"""

from __future__ import annotations

import torch

from .mahalanobis import Mahalanobis


class RMDS(Mahalanobis):
    name = "rmds"
    state_keys = {
        "means": ("K", "D"),
        "precision": ("D", "D"),
        "background_mean": ("D",),
        "background_precision": ("D", "D"),
    }

    def _fit(self, z: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        stats = super()._fit(z, y)  # class means and shared precision (checks N >= 2, every class)
        z64 = z.to(torch.float64)
        mean0 = z64.mean(dim=0)
        centered = z64 - mean0
        cov0 = centered.T @ centered / z.shape[0]
        return {**stats, "background_mean": mean0, "background_precision": torch.linalg.pinv(cov0, hermitian=True)}

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        mean0, prec0 = self._stat("background_mean", x.device), self._stat("background_precision", x.device)
        centered = x.to(torch.float64) - mean0
        md0 = ((centered @ prec0) * centered).sum(dim=1)
        return super()._score(x) + md0  # max_c −MD_c + MD_0
