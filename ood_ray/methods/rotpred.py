"""Rotation prediction (Hendrycks, Mazeika, Kadavath, Song, "Using Self-Supervised Learning Can
Improve Model Robustness and Uncertainty", NeurIPS 2019): an auxiliary 4-way rotation head.

Training: every ID batch ``x`` goes through the network with its three rotated copies
(``torch.rot90`` by 90°, 180°, 270° over height and width), one batch of 4·N. The class head is
trained by cross-entropy on the N unrotated images; a second linear head on the same penultimate
features predicts which of the four rotations each of the 4·N images had::

    loss = CE(class logits of x, y) + CE(rotation logits of the 4·N copies, r)

as OpenOOD v1.5's ``ROTTrainer`` (CIFAR-10 ResNet-18 near/far AUROC 92.7/96.6 on its leaderboard).

Score (``rotpred``, higher = more in-distribution), as OpenOOD's ``RotPredPostprocessor``:
the four rotations are scored together and::

    rotpred = KL(u ‖ softmax(z)) − ¼ Σ_r −log softmax(rotation logits of rot_r(x))_r

with ``z`` the class logits of the unrotated image and ``u`` the uniform distribution over the K
classes: a confident class prediction and a correctly predicted rotation both raise it. OpenOOD
computes both terms in bits (log2); here they are in nats, which divides the score by ln 2 and
ranks every input the same. ``msp`` and ``energy`` of the unrotated image are reported too; the
"don't know" threshold δ applies to MSP (a probability, so δ keeps its meaning across methods).

Rotating needs square images (height = width), which every benchmark here has; a non-square batch
is a clear error. Pure torch; no Ray, MLflow or I/O.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Method, StepResult, energy, msp

ROTATIONS = 4


class RotationHead(nn.Module):
    """The class head and the 4-way rotation head on the same features: ``(logits, rot_logits)``."""

    def __init__(self, num_features: int, num_classes: int):
        super().__init__()
        self.classifier = nn.Linear(num_features, num_classes)
        self.rotation = nn.Linear(num_features, ROTATIONS)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.classifier(z), self.rotation(z)


def rotated(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` with its copies rotated by 90°, 180° and 270° (4·N images) and each copy's rotation
    index 0-3."""
    if x.dim() != 4 or x.shape[2] != x.shape[3]:
        raise ValueError(f"rotpred rotates square images N×C×H×W with H = W, got a batch of shape {tuple(x.shape)}")
    x_rot = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(ROTATIONS)])
    r = torch.arange(ROTATIONS, device=x.device).repeat_interleave(x.shape[0])
    return x_rot, r


def rotpred_score(logits: torch.Tensor, rot_logits: torch.Tensor) -> torch.Tensor:
    """``KL(u ‖ softmax(logits)) − mean_r CE(rot_logits of copy r, r)`` per image (nats).

    ``logits``: N×K of the unrotated images; ``rot_logits``: 4N×4 of the copies in the order of
    ``rotated`` (all images at 0°, then all at 90°, ...)."""
    n, k = logits.shape
    log_p = torch.log_softmax(logits.double(), dim=1)
    kl_uniform = -math.log(k) - log_p.mean(dim=1)  # Σ_c (1/K)·log((1/K)/p_c)
    r = torch.arange(ROTATIONS, device=logits.device).repeat_interleave(n)
    rot_ce = -torch.log_softmax(rot_logits.double(), dim=1).gather(1, r.unsqueeze(1)).reshape(ROTATIONS, n)
    return kl_uniform - rot_ce.mean(dim=0)


class RotPred(Method):
    """Cross-entropy plus rotation prediction on the four rotations; scored by ``rotpred``."""

    name = "rotpred"
    needs_outliers = False
    defaults: dict = {"rot_weight": 1.0, "delta": 0.15}
    default_score = "rotpred"
    threshold_score = "msp"
    nonnegative = ("rot_weight",)
    labels = {"rot_weight": "rot_weight (weight of the rotation loss)"}

    @classmethod
    def search_space(cls, trial) -> dict:
        """The rotation loss's weight (the paper and OpenOOD use 1): it changes training."""
        return {"rot_weight": trial.suggest_float("rot_weight", 0.1, 2.0, log=True)}

    def make_head(self, num_features: int, num_classes: int) -> nn.Module:
        return RotationHead(num_features, num_classes)

    def class_head(self, head: nn.Module) -> nn.Module:
        return head.classifier

    def logits(self, output) -> torch.Tensor:
        if not isinstance(output, tuple | list) or len(output) != 2:
            raise ValueError("rotpred model must return (logits, rotation_logits)")
        return output[0]

    exported_output = "Exported models return the K class logits of the image as given (the rotation logits are left out)."

    def flat_output(self, output) -> torch.Tensor:
        return self.logits(output)

    def training_step(self, model, x, y, x_out, state) -> StepResult:
        x_rot, r = rotated(x)
        logits, rot_logits = model(x_rot)
        cls_loss = F.cross_entropy(logits[: x.shape[0]], y)
        rot_loss = F.cross_entropy(rot_logits, r)
        loss = cls_loss + float(self.params["rot_weight"]) * rot_loss
        return StepResult(loss, {"class_loss": cls_loss.item(), "rotation_loss": rot_loss.item()})

    def scores(self):
        return {"msp": lambda out: msp(self.logits(out)), "energy": lambda out: energy(self.logits(out))}

    def eval_batch(self, model, x):
        n = x.shape[0]
        x_rot, _ = rotated(x)
        logits_all, rot_logits = model(x_rot)
        logits = logits_all[:n]
        return {"logits": logits, "msp": msp(logits), "energy": energy(logits), "rotpred": rotpred_score(logits, rot_logits).to(logits.dtype)}

    def score_names(self) -> list[str]:
        return ["msp", "energy", "rotpred"]
