"""Temperature scaling (Guo, Pleiss, Sun, Weinberger, "On Calibration of Modern Neural Networks",
ICML 2017; OpenOOD's ``temp_scaling``).

score = max_c softmax(l / T)_c of the logits l = head(z) (higher = ID), with one temperature T
fitted on the **val ID** split (``fit_split = "val"``: where the model did not train, as the paper
does) by minimising the mean negative log-likelihood NLL(T) = mean_i −log softmax(l_i / T)_{y_i}.

How T is found: with β = 1/T, NLL is convex in β (a logsumexp of β·l minus the linear β·l_y), and
its derivative g(β) = mean_i (Σ_c p_ic l_ic − l_iy), p = softmax(β·l), is non-decreasing. T is the
root of g, found by bisection on log T over [1e-3, 1e3] in float64 until the bracket is narrower
than 1e-12 (about 45 halvings): deterministic, with no learning rate or starting point, and
accurate to about 1e-12 relative. The minimiser need not exist: when every val sample is classified correctly
the NLL keeps falling as T → 0 (and every score would round to 1), when the logits do worse than
chance it keeps falling as T → ∞ (every score 1/K). When NLL has no minimum inside the bracket, or
the logits are constant in every row (T is irrelevant), T = 1: the plain MSP, uncalibrated.

Other implementations: OpenOOD v1.5 and pytorch-ood 0.4.0 (``TemperatureScaling``) optimise T itself
with ``torch.optim.LBFGS(lr=0.01, max_iter=50)`` and no line search, from T = 1.5 (OpenOOD) or
T = 1 (pytorch-ood), in float32: with that step size 50 iterations usually stop short of the
minimum (pytorch-ood's docstring says so), so their T lies between the start and the optimum
and depends on the start. We take the minimiser itself. pytorch-ood returns −max softmax.
"""

from __future__ import annotations

import math

import torch

from .base import Detector

T_MIN, T_MAX = 1e-3, 1e3
TOL = 1e-12  # width of the final log-T bracket


def nll(logits: torch.Tensor, labels: torch.Tensor, t: float) -> float:
    """Mean negative log-likelihood of ``labels`` under softmax(logits / t)."""
    logp = torch.log_softmax(logits.to(torch.float64) / t, dim=1)
    return float(-logp.gather(1, labels.unsqueeze(1)).mean())


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T in [T_MIN, T_MAX] minimising the NLL, else 1 (see the module docstring)."""
    logits = logits.to(torch.float64)
    if bool((logits.amax(dim=1) == logits.amin(dim=1)).all()):
        return 1.0
    target = logits.gather(1, labels.unsqueeze(1)).squeeze(1)

    def slope(log_t: float) -> float:  # dNLL/dβ at β = exp(−log_t); its sign decides the side
        p = torch.softmax(logits * math.exp(-log_t), dim=1)
        return float(((p * logits).sum(dim=1) - target).mean())

    lo, hi = math.log(T_MIN), math.log(T_MAX)  # in log T; g decreases as log T grows
    if slope(lo) <= 0 or slope(hi) >= 0:  # NLL still falls below T_MIN, or beyond T_MAX
        return 1.0
    while hi - lo > TOL:
        mid = 0.5 * (lo + hi)
        if slope(mid) > 0:  # β too large: T must grow
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


class TempScale(Detector):
    name = "tempscale"
    fit_split = "val"
    state_keys = {"temperature": ("N",)}

    def _fit(self, z: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        t = fit_temperature(self._logits(z), y)
        return {"temperature": torch.tensor([t], dtype=torch.float64, device=z.device)}

    def restore(self, state, head, model=None, *, feature_dim=None) -> TempScale:
        super().restore(state, head, model, feature_dim=feature_dim)
        t = self._stats["temperature"]
        if t.numel() != 1 or not bool((t > 0).all()):
            self._fitted = False
            raise self.error(f"state temperature must hold one value > 0, got {t.tolist()}")
        return self

    @property
    def temperature(self) -> float:
        """The fitted T."""
        if not self._fitted:
            raise self.error("is not fitted: call fit(features, labels, head) first")
        return float(self._stats["temperature"].reshape(-1)[0])

    def fitted(self) -> dict[str, float]:
        return {"T": self.temperature}

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        t = self._stat("temperature", x.device).to(torch.float64)
        return torch.softmax(self._logits(x).to(torch.float64) / t, dim=1).amax(dim=1)
