"""Outlier Exposure (Hendrycks, Mazeika & Dietterich, ICLR 2019): the loss.

With class logits ``z`` the objective is

    L = CE(z_in, y) + λ · mean_over_outliers( logsumexp(z_out) − mean_k z_out_k ),

where the second term is the cross-entropy from the uniform distribution over the K classes to
``softmax(z_out)``, i.e. ``−(1/K) Σ_k log softmax_k(z_out)``; it is minimal at a uniform prediction.
Each term is averaged over its *own* batch, as in the authors' scripts (λ = 0.5 there). This differs
from pytorch-ood's ``OutlierExposureLoss``, which takes one mean over the concatenated batch and so
re-weights the two terms by their batch sizes.

Plain torch only: no Ray, MLflow or I/O.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Method, StepResult


def _uniform_ce(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy from the uniform distribution to ``softmax(logits)``."""
    return torch.logsumexp(logits, dim=1) - logits.mean(dim=1)


def oe_loss(
    logits_in: torch.Tensor,
    targets: torch.Tensor,
    logits_out: torch.Tensor | None,
    lam: float = 0.5,
) -> torch.Tensor:
    """Outlier Exposure loss: ``CE(logits_in, targets) + lam · mean(logsumexp(z) − mean_k z_k)``.

    Args:
        logits_in: in-distribution class logits, shape ``N × K``.
        targets: class indices of the in-distribution samples, shape ``N``.
        logits_out: class logits of the outlier batch, shape ``M × K`` (``M ≥ 1``).
        lam: weight λ ≥ 0 of the outlier term (0.5 in the paper's vision experiments).

    Returns:
        The scalar loss; each term is a mean over its own batch.
    """
    if not lam >= 0:
        raise ValueError(f"Outlier Exposure weight lam must be >= 0, got {lam}")
    if logits_out is None or logits_out.numel() == 0:
        shape = None if logits_out is None else tuple(logits_out.shape)
        raise ValueError(f"Outlier Exposure needs an outlier batch, got logits_out={shape}")
    if logits_in.dim() != 2:
        raise ValueError(f"logits_in must be N × K, got shape {tuple(logits_in.shape)}")
    if logits_out.dim() != 2:
        raise ValueError(f"logits_out must be M × K, got shape {tuple(logits_out.shape)}")
    if logits_in.shape[0] == 0:
        raise ValueError(
            f"Outlier Exposure needs a non-empty in-distribution batch, got logits_in={tuple(logits_in.shape)}"
        )
    if logits_in.shape[1] != logits_out.shape[1]:
        raise ValueError(
            f"class-count mismatch: logits_in has {logits_in.shape[1]} classes, "
            f"logits_out has {logits_out.shape[1]}"
        )
    if targets.shape != logits_in.shape[:1]:
        raise ValueError(
            f"targets must have shape ({logits_in.shape[0]},) to match logits_in, got {tuple(targets.shape)}"
        )
    return F.cross_entropy(logits_in, targets) + lam * _uniform_ce(logits_out).mean()


__all__ = ["oe_loss"]


class OutlierExposure(Method):
    """OE training: ID and outlier images in one forward pass (BatchNorm sees both), scored by MSP."""

    name = "outlier_exposure"
    needs_outliers = True
    defaults: dict = {"lam": 0.5, "outlier_ratio": 2, "delta": 0.15}
    default_score = "msp"
    nonnegative = ("lam",)
    positive = ("outlier_ratio",)

    @classmethod
    def search_space(cls, trial) -> dict:
        return {
            "lam": trial.suggest_float("lam", 0.05, 2.0, log=True),
            "outlier_ratio": trial.suggest_categorical("outlier_ratio", [1, 2, 4]),
        }

    def make_head(self, num_features: int, num_classes: int) -> nn.Module:
        return nn.Linear(num_features, num_classes)

    @classmethod
    def validate(cls, params: dict) -> None:
        if params["outlier_ratio"] > 64:
            raise ValueError(f"outlier_exposure: outlier_ratio={params['outlier_ratio']!r} must be <= 64 outlier images per ID image")

    def outlier_batch(self, batch_size: int) -> int:
        """``outlier_ratio`` outlier images per ID image (the paper: 2)."""
        return int(self.params["outlier_ratio"] * batch_size)

    def training_step(self, model, x, y, x_out, state) -> StepResult:
        if x_out is None:
            raise ValueError("Outlier Exposure needs an outlier stream (the benchmark has no 'outlier' set)")
        logits = self.logits(model(torch.cat([x, x_out])))
        n = len(x)
        loss = oe_loss(logits[:n], y, logits[n:], lam=float(self.params["lam"]))
        return StepResult(loss)
