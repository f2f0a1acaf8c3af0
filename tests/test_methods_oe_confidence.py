"""Outlier Exposure and confidence-branch losses checked against independent re-derivations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ood_ray.methods.confidence import (
    ConfidenceHead,
    check_threshold,
    confidence_loss,
    preprocess_inputs,
    sample_hint_mask,
    update_lambda,
)
from ood_ray.methods.outlier_exposure import oe_loss

TOL = 1e-5


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _oe_inputs(seed=0, n=8, m=16, k=5):
    g = _gen(seed)
    logits_in = torch.randn(n, k, generator=g) * 3
    targets = torch.randint(0, k, (n,), generator=g)
    logits_out = torch.randn(m, k, generator=g) * 3
    return logits_in, targets, logits_out


# ---------------------------------------------------------------------------
# Outlier Exposure


def test_oe_uniform_term_is_cross_entropy_to_uniform():
    logits_in, targets, logits_out = _oe_inputs(seed=1)
    k = logits_out.shape[1]
    # Cross-entropy from the uniform distribution: −(1/K) Σ_k log softmax_k(z), batch mean.
    uniform_ce = (-(1.0 / k) * F.log_softmax(logits_out, dim=1).sum(dim=1)).mean()
    term = oe_loss(logits_in, targets, logits_out, lam=1.0) - F.cross_entropy(logits_in, targets)
    assert term.item() == pytest.approx(uniform_ce.item(), abs=TOL)
    # It is minimal (= log K) at uniform logits.
    flat = torch.zeros(3, k)
    term0 = oe_loss(logits_in, targets, flat, lam=1.0) - F.cross_entropy(logits_in, targets)
    assert term0.item() == pytest.approx(math.log(k), abs=TOL)


@pytest.mark.parametrize("lam", [0.5, 1.0, 2.3])
def test_oe_loss_matches_rederivation(lam):
    logits_in, targets, logits_out = _oe_inputs(seed=2, n=6, m=13, k=4)
    # CE by hand: −log(exp(z_y)/Σ exp z), averaged over the ID batch.
    probs_in = torch.exp(logits_in) / torch.exp(logits_in).sum(dim=1, keepdim=True)
    ce = -torch.log(probs_in[torch.arange(len(targets)), targets]).mean()
    # OE term by hand: mean over the outliers of −mean_k log softmax_k.
    probs_out = torch.exp(logits_out) / torch.exp(logits_out).sum(dim=1, keepdim=True)
    oe = (-torch.log(probs_out).mean(dim=1)).mean()
    got = oe_loss(logits_in, targets, logits_out, lam=lam)
    assert got.item() == pytest.approx((ce + lam * oe).item(), abs=TOL)


def test_oe_loss_means_each_batch_separately_not_concatenation():
    logits_in, targets, logits_out = _oe_inputs(seed=3, n=4, m=12, k=3)
    lam = 0.5
    got = oe_loss(logits_in, targets, logits_out, lam=lam).item()
    # pytorch-ood style single mean over the concatenated batch differs when n != m.
    ce_per = F.cross_entropy(logits_in, targets, reduction="none")
    oe_per = torch.logsumexp(logits_out, 1) - logits_out.mean(1)
    concat = (torch.cat([ce_per, lam * oe_per])).mean().item()
    separate = (ce_per.mean() + lam * oe_per.mean()).item()
    assert got == pytest.approx(separate, abs=TOL)
    assert abs(got - concat) > 1e-3


def test_oe_lam_zero_is_plain_cross_entropy():
    logits_in, targets, logits_out = _oe_inputs(seed=4)
    got = oe_loss(logits_in, targets, logits_out, lam=0.0)
    assert got.item() == pytest.approx(F.cross_entropy(logits_in, targets).item(), abs=TOL)


def test_oe_default_lam_is_half():
    logits_in, targets, logits_out = _oe_inputs(seed=5)
    assert oe_loss(logits_in, targets, logits_out).item() == pytest.approx(
        oe_loss(logits_in, targets, logits_out, lam=0.5).item(), abs=TOL
    )


def test_oe_loss_gradient_flows_to_outlier_logits():
    logits_in, targets, logits_out = _oe_inputs(seed=6)
    logits_out.requires_grad_(True)
    oe_loss(logits_in, targets, logits_out).backward()
    assert logits_out.grad is not None and logits_out.grad.abs().sum() > 0


def test_oe_errors():
    logits_in, targets, logits_out = _oe_inputs(seed=7, k=5)
    with pytest.raises(ValueError, match="-0.1"):
        oe_loss(logits_in, targets, logits_out, lam=-0.1)
    with pytest.raises(ValueError, match="Outlier Exposure needs an outlier batch.*None"):
        oe_loss(logits_in, targets, None)
    with pytest.raises(ValueError, match=r"Outlier Exposure needs an outlier batch.*\(0, 5\)"):
        oe_loss(logits_in, targets, torch.zeros(0, 5))
    with pytest.raises(ValueError, match="5 classes.*3"):
        oe_loss(logits_in, targets, torch.zeros(4, 3))


# ---------------------------------------------------------------------------
# Confidence branch: loss


def _conf_inputs(seed=0, n=10, k=4):
    g = _gen(seed)
    logits = torch.randn(n, k, generator=g) * 2
    conf_logit = torch.randn(n, generator=g) * 2
    targets = torch.randint(0, k, (n,), generator=g)
    return logits, conf_logit, targets


def test_confidence_loss_no_hints_is_nll_plus_confidence_term():
    logits, conf_logit, targets = _conf_inputs(seed=10)
    lam = 0.37
    total, task, conf = confidence_loss(logits, conf_logit, targets, lam, torch.zeros(len(targets)))
    exp_task = F.cross_entropy(logits, targets)
    exp_conf = (-F.logsigmoid(conf_logit)).mean()
    assert task.item() == pytest.approx(exp_task.item(), abs=TOL)
    assert conf.item() == pytest.approx(exp_conf.item(), abs=TOL)
    assert total.item() == pytest.approx((exp_task + lam * exp_conf).item(), abs=TOL)


def test_confidence_loss_all_hints_matches_rederivation():
    logits, conf_logit, targets = _conf_inputs(seed=11, n=12, k=6)
    lam = 0.1
    total, task, conf = confidence_loss(logits, conf_logit, targets, lam, torch.ones(len(targets)))
    p = torch.softmax(logits, 1).clamp(1e-12, 1 - 1e-12)
    c = torch.sigmoid(conf_logit).clamp(1e-12, 1 - 1e-12).unsqueeze(1)
    onehot = F.one_hot(targets, logits.shape[1]).float()
    p_new = c * p + (1 - c) * onehot
    exp_task = F.nll_loss(torch.log(p_new), targets)
    exp_conf = -torch.log(c).mean()
    assert task.item() == pytest.approx(exp_task.item(), abs=TOL)
    assert conf.item() == pytest.approx(exp_conf.item(), abs=TOL)
    assert total.item() == pytest.approx((exp_task + lam * exp_conf).item(), abs=TOL)


def test_confidence_loss_mixed_mask_and_column_shapes():
    logits, conf_logit, targets = _conf_inputs(seed=12, n=9, k=3)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1], dtype=torch.float32)
    a = confidence_loss(logits, conf_logit, targets, 0.5, mask)
    b = confidence_loss(logits, conf_logit.unsqueeze(1), targets, 0.5, mask.unsqueeze(1))
    for x, y in zip(a, b, strict=True):
        assert x.item() == pytest.approx(y.item(), abs=TOL)
    # Independent: per-sample, hinted rows use c, others c' = 1.
    p = torch.softmax(logits, 1)
    c = torch.sigmoid(conf_logit)
    terms = []
    for i in range(len(targets)):
        ci = c[i] if mask[i] == 1 else torch.tensor(1.0)
        terms.append(-torch.log(ci * p[i, targets[i]] + (1 - ci)))
    assert a[1].item() == pytest.approx(torch.stack(terms).mean().item(), abs=TOL)
    # The confidence term covers all samples, hinted or not.
    assert a[2].item() == pytest.approx((-torch.log(c)).mean().item(), abs=TOL)


def test_confidence_loss_hand_computed_two_samples():
    # p_0 = (1/2, 1/2), p_1 = (3/4, 1/4); c_0 = 1/2, c_1 = 3/4; y = (0, 1); mask = (1, 0).
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    conf_logit = torch.tensor([0.0, math.log(3.0)])
    targets = torch.tensor([0, 1])
    mask = torch.tensor([1.0, 0.0])
    total, task, conf = confidence_loss(logits, conf_logit, targets, 0.2, mask)
    # sample 0: c' = 1/2, p'_y = 1/2·1/2 + 1/2 = 3/4;  sample 1: c' = 1, p'_y = 1/4.
    exp_task = (math.log(4 / 3) + math.log(4)) / 2
    # L_c = (−log 1/2 − log 3/4)/2, over both samples.
    exp_conf = (math.log(2) + math.log(4 / 3)) / 2
    assert task.item() == pytest.approx(exp_task, abs=TOL)
    assert conf.item() == pytest.approx(exp_conf, abs=TOL)
    assert total.item() == pytest.approx(exp_task + 0.2 * exp_conf, abs=TOL)


def test_confidence_loss_clamps_extreme_values():
    logits = torch.tensor([[200.0, -200.0]])
    conf_logit = torch.tensor([-200.0])
    targets = torch.tensor([1])
    total, task, conf = confidence_loss(logits, conf_logit, targets, 1.0, torch.zeros(1))
    assert torch.isfinite(total)
    assert task.item() == pytest.approx(-math.log(1e-12), rel=1e-4)
    assert conf.item() == pytest.approx(-math.log(1e-12), rel=1e-4)


def test_confidence_loss_errors():
    logits, conf_logit, targets = _conf_inputs(seed=13, n=5, k=3)
    ones = torch.ones(5)
    with pytest.raises(ValueError, match="-0.5"):
        confidence_loss(logits, conf_logit, targets, -0.5, ones)
    with pytest.raises(ValueError, match=r"confidence_logit.*\(4,\)"):
        confidence_loss(logits, conf_logit[:4], targets, 0.1, ones)
    with pytest.raises(ValueError, match=r"confidence_logit.*\(5, 2\)"):
        confidence_loss(logits, torch.zeros(5, 2), targets, 0.1, ones)
    with pytest.raises(ValueError, match=r"targets.*\(6,\)"):
        confidence_loss(logits, conf_logit, torch.zeros(6, dtype=torch.long), 0.1, ones)
    with pytest.raises(ValueError, match=r"hint_mask.*\(3,\)"):
        confidence_loss(logits, conf_logit, targets, 0.1, torch.ones(3))
    with pytest.raises(ValueError, match=r"logits.*\(5,\)"):
        confidence_loss(logits[:, 0], conf_logit, targets, 0.1, ones)
    with pytest.raises(ValueError, match="0.5"):
        confidence_loss(logits, conf_logit, targets, 0.1, torch.tensor([1.0, 0.0, 0.5, 1.0, 1.0]))
    with pytest.raises(ValueError, match="7"):
        confidence_loss(logits, conf_logit, torch.tensor([0, 1, 7, 0, 0]), 0.1, ones)


# ---------------------------------------------------------------------------
# Hint mask, λ controller, threshold


def test_sample_hint_mask_marginal_and_values():
    mask = sample_hint_mask(100_000, generator=_gen(20))
    assert mask.shape == (100_000,)
    assert mask.dtype.is_floating_point
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert abs(mask.mean().item() - 0.5) < 0.01


def test_sample_hint_mask_generator_is_reproducible():
    a = sample_hint_mask(64, generator=_gen(21))
    b = sample_hint_mask(64, generator=_gen(21))
    c = sample_hint_mask(64, generator=_gen(22))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert sample_hint_mask(0).shape == (0,)


def test_sample_hint_mask_draws_u_then_bernoulli():
    # Same stream as the original code: u ~ U(0, 1) per sample, then b ~ Bernoulli(u).
    g = _gen(24)
    u = torch.rand(1000, generator=g)
    expected = torch.bernoulli(u, generator=g)
    assert torch.equal(sample_hint_mask(1000, generator=_gen(24)), expected)


def test_sample_hint_mask_rejects_negative_n():
    with pytest.raises(ValueError, match="-3"):
        sample_hint_mask(-3)


def test_update_lambda_always_above_budget_rises():
    lam0, lam = 0.1, 0.1
    for _ in range(100):
        lam = update_lambda(lam, 0.8, budget=0.3)
    assert lam == pytest.approx(lam0 / 0.99**100, rel=TOL)


def test_update_lambda_always_below_budget_falls():
    lam = 0.1
    for _ in range(100):
        lam = update_lambda(lam, torch.tensor(0.05), budget=0.3)
    assert lam == pytest.approx(0.1 / 1.01**100, rel=TOL)


def test_update_lambda_alternating_matches_independent_loop():
    budget = 0.3
    g = _gen(23)
    losses = (torch.rand(200, generator=g) * 0.6).tolist() + [0.3]  # includes L_c == β (rises)
    lam = 0.1
    for lc in losses:
        lam = update_lambda(lam, lc, budget)
    n_below = sum(1 for lc in losses if lc < budget)
    n_other = len(losses) - n_below
    assert 0 < n_below < len(losses)
    assert lam == pytest.approx(0.1 * 1.01**-n_below * 0.99**-n_other, rel=TOL)
    # Strict alternation returns close to the start: (1/1.01·1/0.99)^50.
    lam = 0.1
    for i in range(100):
        lam = update_lambda(lam, 0.1 if i % 2 == 0 else 0.5, budget)
    assert lam == pytest.approx(0.1 / (1.01 * 0.99) ** 50, rel=TOL)


def test_update_lambda_errors():
    with pytest.raises(ValueError, match="β \\(budget\\) must be > 0.*0"):
        update_lambda(0.1, 0.2, 0)
    with pytest.raises(ValueError, match="-0.2"):
        update_lambda(0.1, 0.2, -0.2)
    with pytest.raises(ValueError, match="-0.1"):
        update_lambda(-0.1, 0.2, 0.3)


def test_check_threshold():
    for delta in (0, 0.0, 0.5, 1, 1.0):
        check_threshold(delta)
    for delta in (-0.01, 1.5):
        with pytest.raises(ValueError, match=str(delta)):
            check_threshold(delta)


# ---------------------------------------------------------------------------
# Head and input preprocessing


def test_confidence_head_shapes():
    torch.manual_seed(30)
    head = ConfidenceHead(16, 7)
    assert isinstance(head.classifier, nn.Linear) and head.classifier.out_features == 7
    assert isinstance(head.confidence, nn.Linear) and head.confidence.out_features == 1
    logits, conf = head(torch.randn(5, 16))
    assert logits.shape == (5, 7)
    assert conf.shape == (5,)
    logits, conf = head(torch.randn(1, 16))
    assert conf.shape == (1,)


class LinearConfModel(nn.Module):
    def __init__(self, d=6, k=3):
        super().__init__()
        self.head = ConfidenceHead(d, k)

    def forward(self, x):
        return self.head(x.flatten(1))


class MLPConfModel(nn.Module):
    def __init__(self, d=6, k=3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.BatchNorm1d(8))
        self.head = ConfidenceHead(8, k)

    def forward(self, x):
        return self.head(self.body(x))


def test_preprocess_linear_model_closed_form_and_increases_confidence():
    torch.manual_seed(31)
    model = LinearConfModel().eval()
    x = torch.randn(4, 6)
    eps = 0.01
    got = preprocess_inputs(model, x, eps)
    # s = w·x + b and d/ds(−log σ(s)) = −(1 − σ(s)) < 0, so sign(∇_x) = −sign(w) for every row.
    w = model.head.confidence.weight.detach()[0]
    expected = x + eps * torch.sign(w)
    assert torch.allclose(got, expected, atol=TOL)
    with torch.no_grad():
        before = torch.sigmoid(model(x)[1])
        after = torch.sigmoid(model(got)[1])
    assert (after > before).all()


def test_preprocess_matches_independent_gradient_and_leaves_no_grads():
    torch.manual_seed(32)
    model = MLPConfModel()
    model.train()
    model(torch.randn(16, 6))  # populate BN running stats
    model.eval()
    x = torch.randn(5, 6)
    eps = 0.002
    got = preprocess_inputs(model, x, eps)
    assert not got.requires_grad
    assert not model.training  # mode left as given
    assert all(p.grad is None for p in model.parameters())
    # Independent: a separate model copy with backward().
    import copy

    ref = copy.deepcopy(model)
    xr = x.clone().requires_grad_(True)
    c = torch.sigmoid(ref(xr)[1]).clamp(1e-12, 1 - 1e-12)
    (-torch.log(c)).mean().backward()
    expected = x - eps * xr.grad.sign()
    assert torch.allclose(got, expected, atol=TOL)
    with torch.no_grad():
        assert torch.sigmoid(model(got)[1]).mean() > torch.sigmoid(model(x)[1]).mean()


def test_preprocess_keeps_existing_param_grads_and_works_under_no_grad():
    torch.manual_seed(33)
    model = LinearConfModel().eval()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    x = torch.randn(3, 6)
    with torch.no_grad():
        got = preprocess_inputs(model, x, 0.05)
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    w = model.head.confidence.weight.detach()[0]
    assert torch.allclose(got, x + 0.05 * torch.sign(w), atol=TOL)
    assert not x.requires_grad


def test_preprocess_epsilon_zero_returns_input():
    torch.manual_seed(34)
    model = LinearConfModel().eval()
    x = torch.randn(3, 6)
    got = preprocess_inputs(model, x, 0.0)
    assert torch.equal(got, x)
    assert not got.requires_grad


def test_preprocess_errors():
    torch.manual_seed(35)
    model = LinearConfModel().eval()
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match="-0.001"):
        preprocess_inputs(model, x, -0.001)
    with pytest.raises(
        ValueError, match=r"confidence model must return \(logits, confidence_logit\).*Tensor"
    ):
        preprocess_inputs(nn.Linear(6, 3), x, 0.01)
    with pytest.raises(
        ValueError, match=r"confidence model must return \(logits, confidence_logit\)"
    ):
        preprocess_inputs(lambda t: (t, t, t), x, 0.01)


def test_confidence_refuses_lam_zero():
    """λ is adapted by multiplying (λ/1.01 or λ/0.99): from 0 it would stay 0 and ignore β."""
    from ood_ray.methods import get_method

    with pytest.raises(ValueError, match="lam"):
        get_method("confidence", {"lam": 0.0})
    assert get_method("confidence", {"lam": 1e-4}).initial_state() == {"lam": 1e-4}
