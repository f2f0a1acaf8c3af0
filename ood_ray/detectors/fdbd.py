"""fDBD (Liu & Qin, "Fast Decision Boundary based Out-of-Distribution Detector", ICML 2024).

With ŷ = argmax logits, the distance of z to the decision boundary between ŷ and c is
|(w_ŷ − w_c)·z + (b_ŷ − b_c)| / ‖w_ŷ − w_c‖; the score is the mean over c ≠ ŷ of those distances
divided by ‖z − μ_train‖ (the paper's regularisation by the distance to the train feature mean).
OpenOOD sums over all classes (the ŷ term is 0): the same score times K − 1. OpenOOD can also pick
the feature norm ‖z‖ as the regulariser on validation data; this implementation follows the paper.
"""

from __future__ import annotations

import torch

from .base import Detector

TINY = 1e-12  # guards a zero ‖w_ŷ − w_c‖ (identical rows) or z exactly at the train mean


class FDBD(Detector):
    name = "fdbd"
    needs_linear_head = True
    state_keys = {"train_mean": ("D",)}

    def _fit(self, z: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.num_classes < 2:
            raise self.error(f"needs a head with at least 2 classes, got K={self.num_classes}")
        return {"train_mean": z.to(torch.float64).mean(dim=0)}

    def _gaps(self, device: torch.device) -> torch.Tensor:
        """‖w_i − w_j‖ for every pair of classes (K×K), computed once per fit/restore."""
        gaps = self._cache.get("gaps")
        if gaps is None or gaps.device != device:
            weight, _ = self._weight_bias(device)
            gaps = torch.cdist(weight, weight, compute_mode="donot_use_mm_for_euclid_dist").clamp_min(TINY)
            self._cache["gaps"] = gaps
        return gaps

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        z = x.to(torch.float64)
        logits = self._linear(z)
        top, pred = logits.max(dim=1, keepdim=True)
        dist = (top - logits).abs() / self._gaps(x.device)[pred.squeeze(1)]  # 0 for c = ŷ
        mean_dist = dist.sum(dim=1) / (logits.shape[1] - 1)
        spread = torch.linalg.vector_norm(z - self._stat("train_mean", x.device), dim=1).clamp_min(TINY)
        return mean_dist / spread
