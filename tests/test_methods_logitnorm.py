"""LogitNorm (Wei et al. 2022): the loss against an explicit derivation, on CPU without Ray."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ood_ray.methods import get_method
from ood_ray.methods.logitnorm import logitnorm_loss


def explicit(z: torch.Tensor, y: torch.Tensor, tau: float) -> float:
    """Mean over samples of -log softmax(z_i / (τ (‖z_i‖ + 1e-7)))[y_i], one sample at a time."""
    total = 0.0
    for zi, yi in zip(z.double(), y, strict=True):
        s = zi / (tau * (math.sqrt(float((zi * zi).sum())) + 1e-7))
        total += float(torch.logsumexp(s, 0) - s[yi])
    return total / len(z)


@pytest.mark.parametrize("tau", [0.04, 0.1, 1.0])
def test_loss_matches_the_explicit_formula(tau):
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(16, 10, generator=g) * 3, torch.randint(0, 10, (16,), generator=g)
    assert float(logitnorm_loss(z, y, tau)) == pytest.approx(explicit(z, y, tau), rel=1e-5)


def test_loss_ignores_the_logits_norm_and_cross_entropy_does_not():
    g = torch.Generator().manual_seed(1)
    z, y = torch.randn(8, 5, generator=g), torch.randint(0, 5, (8,), generator=g)
    assert float(logitnorm_loss(10 * z, y, 0.1)) == pytest.approx(float(logitnorm_loss(z, y, 0.1)), rel=1e-5)
    assert float(F.cross_entropy(10 * z, y)) != pytest.approx(float(F.cross_entropy(z, y)), rel=1e-2)


def test_gradient_has_no_component_along_the_logits():
    """The normalised loss depends on the direction only, so its gradient is orthogonal to z."""
    z = torch.randn(4, 6, generator=torch.Generator().manual_seed(2), requires_grad=True)
    logitnorm_loss(z, torch.tensor([0, 1, 2, 3]), 0.04).backward()
    radial = (z.grad * z.detach()).sum(1)
    assert torch.allclose(radial, torch.zeros(4), atol=1e-5) and z.grad.abs().sum() > 0


def test_zero_logits_stay_finite_and_bad_tau_is_refused():
    z = torch.zeros(3, 4, requires_grad=True)
    loss = logitnorm_loss(z, torch.tensor([0, 1, 2]), 0.04)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(4)) and torch.isfinite(z.grad).all()
    with pytest.raises(ValueError, match="tau"):
        logitnorm_loss(z, torch.tensor([0, 1, 2]), 0.0)
    with pytest.raises(ValueError, match=r"tau \(τ\)=-1"):
        get_method("logitnorm", {"tau": -1})


def test_scores_use_the_raw_logits():
    m = get_method("logitnorm")
    z = torch.tensor([[4.0, 0.0, 0.0], [0.4, 0.0, 0.0]])
    scores = m.scores()
    assert torch.allclose(scores["msp"](z), torch.softmax(z, 1).max(1).values)
    assert scores["msp"](z)[0] > scores["msp"](z)[1]  # same direction, larger norm: more confident
    assert m.temperature(torch.nn.Linear(2, 3)) is None  # τ is a training temperature, not a calibration
