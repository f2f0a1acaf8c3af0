"""DisMax functional API: head, losses, FPR mixing, scores and temperature calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize

from ood_ray.methods.dismax import (
    SCORES,
    DisMaxHead,
    calibrate_temperature,
    dismax_loss,
    es,
    fpr_loss,
    fpr_mix,
    mds,
    mmles,
    mmls,
    mps,
    score,
)
from ood_ray.metrics import ece

ATOL = 1e-5


def _head(num_features=6, num_classes=4, seed=0, scale=1.0, dtype=torch.float64):
    torch.manual_seed(seed)
    head = DisMaxHead(num_features, num_classes).to(dtype)
    with torch.no_grad():
        head.distance_scale.fill_(scale)
    return head


def _explicit_distances(head: DisMaxHead, feats: torch.Tensor) -> torch.Tensor:
    """d_ij = |s| * || f_i/|f_i| - p_j/|p_j| ||_2 / sqrt(2), with explicit Python loops."""
    s = abs(head.distance_scale.item())
    protos = head.prototypes.detach()
    out = torch.empty(feats.shape[0], protos.shape[0], dtype=torch.float64)
    for i in range(feats.shape[0]):
        f = feats[i].double()
        f_hat = f / math.sqrt(float((f * f).sum()))
        for j in range(protos.shape[0]):
            p = protos[j].double()
            p_hat = p / math.sqrt(float((p * p).sum()))
            diff = f_hat - p_hat
            out[i, j] = s * math.sqrt(float((diff * diff).sum())) / math.sqrt(2.0)
    return out


# ---------------------------------------------------------------------------
# head
# ---------------------------------------------------------------------------


def test_head_parameters_and_init():
    torch.manual_seed(0)
    head = DisMaxHead(64, 10)
    names = dict(head.named_parameters())
    assert set(names) == {"prototypes", "distance_scale"}
    assert head.prototypes.shape == (10, 64)
    assert head.distance_scale.shape == (1,)
    assert head.distance_scale.item() == 1.0
    # N(0, 1) init: 640 draws, mean ~ 0 and std ~ 1
    assert abs(head.prototypes.mean().item()) < 0.15
    assert abs(head.prototypes.std().item() - 1.0) < 0.1


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_head_logits_match_explicit_derivation(temperature):
    head = _head(num_features=6, num_classes=4, seed=1, scale=-1.7)  # |s| is used
    head.temperature.fill_(temperature)
    torch.manual_seed(2)
    feats = torch.randn(5, 6, dtype=torch.float64)
    d = _explicit_distances(head, feats)
    expected = torch.empty_like(d)
    for i in range(d.shape[0]):
        mean_d = sum(float(d[i, k]) for k in range(d.shape[1])) / d.shape[1]
        for j in range(d.shape[1]):
            expected[i, j] = -(float(d[i, j]) + mean_d) / temperature
    got = head(feats)
    assert got.shape == (5, 4)
    torch.testing.assert_close(got.detach(), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(head.distances(feats).detach(), d, atol=ATOL, rtol=0)


def test_head_exact_zero_distance_has_finite_gradient():
    head = _head(num_features=8, num_classes=3, seed=3, dtype=torch.float32)
    # a feature equal to prototype 0 is at distance exactly 0 from it; the backward pass must
    # stay finite there
    feats = head.prototypes.detach()[:1].clone().requires_grad_(True)
    d = head.distances(feats)
    assert d[0, 0].item() == 0.0
    head(feats).sum().backward()
    assert torch.isfinite(head.prototypes.grad).all()
    assert torch.isfinite(feats.grad).all()
    # 5x the same direction: distance ~0 up to float32 rounding of the normalisation
    assert head.distances(5.0 * feats.detach())[0, 0].item() < 1e-6


def test_head_small_distances_are_exact_in_float32():
    # features within ~1e-3 of a prototype direction: the ||a||^2 + ||b||^2 - 2ab expansion
    # loses these to cancellation in float32 (errors ~1e-4); the exact computation does not
    head = _head(num_features=16, num_classes=3, seed=17, dtype=torch.float32)
    torch.manual_seed(18)
    protos = F.normalize(head.prototypes.detach(), dim=1)
    feats = protos.repeat(4, 1) + 1e-3 * torch.randn(12, 16)
    got = head.distances(feats).detach().double()
    want = _explicit_distances(head, feats)
    assert float(want.min()) < 5e-3  # the regime under test
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_head_logits_invariant_to_feature_scale():
    head = _head(seed=4)
    torch.manual_seed(5)
    feats = torch.randn(7, 6, dtype=torch.float64)
    torch.testing.assert_close(head(7.3 * feats), head(feats), atol=ATOL, rtol=0)


def test_mean_term_cancels_in_softmax_but_not_in_mmles():
    head = _head(seed=6, scale=2.3)
    torch.manual_seed(7)
    feats = torch.randn(9, 6, dtype=torch.float64)
    z = head(feats).detach()
    d = _explicit_distances(head, feats)
    isomax_plus = -d  # IsoMax+-style logits (up to the 1/sqrt(2) absorbed by the scale)
    torch.testing.assert_close(
        torch.softmax(z, dim=1), torch.softmax(isomax_plus, dim=1), atol=ATOL, rtol=0
    )
    # mps / es only see probabilities, so they agree too
    torch.testing.assert_close(mps(z), mps(isomax_plus), atol=ATOL, rtol=0)
    torch.testing.assert_close(es(z), es(isomax_plus), atol=ATOL, rtol=0)
    # mmles does not: max z + mean z = -(d_min + dbar) - 2 dbar vs -d_min - dbar
    diff = mmles(z) - mmles(isomax_plus)
    assert (diff.abs() > 1e-3).all()
    torch.testing.assert_close(diff, -2.0 * d.mean(dim=1), atol=ATOL, rtol=0)


def test_temperature_buffer_in_state_dict_and_divides_logits():
    head = _head(seed=8)
    assert "temperature" in head.state_dict()
    assert float(head.state_dict()["temperature"]) == 1.0
    assert all(name != "temperature" for name, _ in head.named_parameters())
    assert not head.temperature.requires_grad
    torch.manual_seed(9)
    feats = torch.randn(4, 6, dtype=torch.float64)
    z1 = head(feats).detach()
    head.temperature.fill_(2.5)
    torch.testing.assert_close(head(feats).detach(), z1 / 2.5, atol=ATOL, rtol=0)
    # round trip through a state_dict restores the temperature
    fresh = DisMaxHead(6, 4).double()
    fresh.load_state_dict(head.state_dict())
    assert float(fresh.temperature) == 2.5
    torch.testing.assert_close(fresh(feats).detach(), z1 / 2.5, atol=ATOL, rtol=0)
    # constructor default can be overridden, and must be positive
    assert float(DisMaxHead(3, 2, temperature=0.7).temperature) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="temperature"):
        DisMaxHead(3, 2, temperature=0.0)


def test_head_rejects_bad_feature_shape():
    head = DisMaxHead(6, 4)
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        head(torch.randn(3, 5))


# ---------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------


def test_dismax_loss_is_ce_of_scaled_logits():
    torch.manual_seed(10)
    z = torch.randn(12, 5, dtype=torch.float64)
    y = torch.randint(0, 5, (12,))
    torch.testing.assert_close(dismax_loss(z, y), F.cross_entropy(10.0 * z, y), atol=ATOL, rtol=0)
    torch.testing.assert_close(
        dismax_loss(z, y, entropic_scale=3.0), F.cross_entropy(3.0 * z, y), atol=ATOL, rtol=0
    )
    # explicit: mean_i -log softmax(10 z)_{i, y_i}
    e = torch.exp(10.0 * z)
    manual = -torch.log(e[torch.arange(12), y] / e.sum(dim=1)).mean()
    torch.testing.assert_close(dismax_loss(z, y), manual, atol=ATOL, rtol=0)


def test_dismax_loss_trains_head():
    torch.manual_seed(11)
    head = DisMaxHead(4, 3)
    feats = torch.randn(30, 4)
    y = torch.randint(0, 3, (30,))
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    first = None
    for _ in range(50):
        loss = dismax_loss(head(feats), y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first


# ---------------------------------------------------------------------------
# FPR mixing
# ---------------------------------------------------------------------------


def test_fpr_mix_even_constant_images_pixel_by_pixel():
    values = [10.0, 20.0, 30.0, 40.0]
    images = torch.stack([torch.full((1, 4, 4), v) for v in values])
    before = images.clone()
    mixed, _ = fpr_mix(images, torch.tensor([0, 1, 2, 3]), num_classes=4)
    # image i: top-left i, bottom-left i-1, top-right i-2, bottom-right i-3 (cyclic)
    expected = torch.tensor(
        [
            [[10, 10, 30, 30], [10, 10, 30, 30], [40, 40, 20, 20], [40, 40, 20, 20]],
            [[20, 20, 40, 40], [20, 20, 40, 40], [10, 10, 30, 30], [10, 10, 30, 30]],
            [[30, 30, 10, 10], [30, 30, 10, 10], [20, 20, 40, 40], [20, 20, 40, 40]],
            [[40, 40, 20, 20], [40, 40, 20, 20], [30, 30, 10, 10], [30, 30, 10, 10]],
        ],
        dtype=torch.float32,
    ).unsqueeze(1)
    assert mixed.shape == images.shape
    assert torch.equal(mixed, expected)
    assert torch.equal(images, before)  # input untouched


def test_fpr_mix_odd_size_pixel_by_pixel():
    # 3 images 1x5x5; top/left parts get 5//2 = 2 rows/cols, bottom/right get 3
    images = torch.stack([torch.full((1, 5, 5), v) for v in (1.0, 2.0, 3.0)])
    mixed, _ = fpr_mix(images, torch.tensor([0, 1, 2]), num_classes=3)
    # batch 3: i-1, i-2, i-3 = i-1, i+1, i (cyclic)
    expected = torch.tensor(
        [
            [
                [1, 1, 2, 2, 2],
                [1, 1, 2, 2, 2],
                [3, 3, 1, 1, 1],
                [3, 3, 1, 1, 1],
                [3, 3, 1, 1, 1],
            ],
            [
                [2, 2, 3, 3, 3],
                [2, 2, 3, 3, 3],
                [1, 1, 2, 2, 2],
                [1, 1, 2, 2, 2],
                [1, 1, 2, 2, 2],
            ],
            [
                [3, 3, 1, 1, 1],
                [3, 3, 1, 1, 1],
                [2, 2, 3, 3, 3],
                [2, 2, 3, 3, 3],
                [2, 2, 3, 3, 3],
            ],
        ],
        dtype=torch.float32,
    ).unsqueeze(1)
    assert torch.equal(mixed, expected)


def test_fpr_mix_keeps_pixel_positions_and_channels():
    # pixel value encodes (image, channel, row, col): every output pixel comes from the same
    # (channel, row, col) of its source image
    n, c, h, w = 5, 2, 6, 7
    idx = torch.arange(n * c * h * w, dtype=torch.float64).reshape(n, c, h, w)
    mixed, _ = fpr_mix(idx, torch.zeros(n, dtype=torch.long), num_classes=1)
    for i in range(n):
        for ch in range(c):
            for r in range(h):
                for col in range(w):
                    top, left = r < h // 2, col < w // 2
                    shift = {
                        (True, True): 0,
                        (False, True): 1,
                        (True, False): 2,
                        (False, False): 3,
                    }[(top, left)]
                    src = (i - shift) % n
                    assert float(mixed[i, ch, r, col]) == float(idx[src, ch, r, col])


def test_fpr_mix_target_distribution_with_repeated_labels():
    images = torch.zeros(5, 1, 4, 4)
    y = torch.tensor([2, 0, 2, 1, 1])
    _, t = fpr_mix(images, y, num_classes=4)
    expected = torch.tensor(
        [
            [0.0, 0.5, 0.5, 0.0],  # y0=2, y4=1, y3=1, y2=2
            [0.25, 0.5, 0.25, 0.0],  # y1=0, y0=2, y4=1, y3=1
            [0.25, 0.25, 0.5, 0.0],  # y2=2, y1=0, y0=2, y4=1
            [0.25, 0.25, 0.5, 0.0],  # y3=1, y2=2, y1=0, y0=2
            [0.25, 0.5, 0.25, 0.0],  # y4=1, y3=1, y2=2, y1=0
        ]
    )
    torch.testing.assert_close(t, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(t.sum(dim=1), torch.ones(5), atol=ATOL, rtol=0)
    # distinct labels over a batch of 4: 0.25 on each
    _, t4 = fpr_mix(torch.zeros(4, 1, 2, 2), torch.tensor([0, 1, 2, 3]), num_classes=5)
    torch.testing.assert_close(
        t4, torch.tensor([[0.25, 0.25, 0.25, 0.25, 0.0]] * 4), atol=ATOL, rtol=0
    )


def test_fpr_mix_batch_of_two():
    images = torch.stack([torch.full((1, 2, 2), v) for v in (1.0, 2.0)])
    mixed, t = fpr_mix(images, torch.tensor([0, 1]), num_classes=2)
    # i-1 = i-3 = other image, i-2 = itself
    expected = torch.tensor([[[1.0, 1.0], [2.0, 2.0]], [[2.0, 2.0], [1.0, 1.0]]]).unsqueeze(1)
    assert torch.equal(mixed, expected)
    torch.testing.assert_close(t, torch.full((2, 2), 0.5), atol=ATOL, rtol=0)


@pytest.mark.parametrize("n", [0, 1])
def test_fpr_mix_needs_batch_of_two(n):
    with pytest.raises(ValueError, match="needs a batch of at least 2"):
        fpr_mix(torch.zeros(n, 1, 4, 4), torch.zeros(n, dtype=torch.long), num_classes=3)


def test_fpr_mix_rejects_bad_targets():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        fpr_mix(torch.zeros(4, 1, 4, 4), torch.tensor([0, 1, 2, 3]), num_classes=3)
    with pytest.raises(ValueError, match="shape"):
        fpr_mix(torch.zeros(4, 1, 4, 4), torch.tensor([0, 1, 2]), num_classes=3)


def _fpr_loss_reference(zp, yp, zm, t, alpha, e=10.0):
    n_p = zp.shape[0]
    ce = 0.0
    for i in range(n_p):
        row = [e * float(v) for v in zp[i]]
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        ce += -(row[int(yp[i])] - lse)
    ce /= n_p
    kl = 0.0
    for i in range(zm.shape[0]):
        row = [e * float(v) for v in zm[i]]
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        for k, tk in enumerate(t[i].tolist()):
            if tk > 0:
                kl += tk * (math.log(tk) - (row[k] - lse))
    kl /= zm.shape[0]
    return (ce + alpha * kl) / 2


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0])
def test_fpr_loss_matches_reference(alpha):
    torch.manual_seed(12)
    zp = 0.3 * torch.randn(6, 4, dtype=torch.float64)
    yp = torch.randint(0, 4, (6,))
    zm = 0.3 * torch.randn(5, 4, dtype=torch.float64)
    _, t = fpr_mix(torch.zeros(5, 1, 4, 4), torch.tensor([2, 0, 2, 1, 1]), num_classes=4)
    t = t.double()
    got = fpr_loss(zp, yp, zm, t, alpha=alpha)
    expected = _fpr_loss_reference(zp, yp, zm, t, alpha)
    assert float(got) == pytest.approx(expected, abs=ATOL)
    # with alpha = 0 it is half the plain DisMax loss
    if alpha == 0.0:
        assert float(got) == pytest.approx(float(dismax_loss(zp, yp)) / 2, abs=ATOL)


def test_fpr_loss_entropic_scale_and_negative_alpha():
    torch.manual_seed(13)
    zp, zm = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    yp = torch.tensor([0, 1, 2, 0])
    _, t = fpr_mix(torch.zeros(4, 1, 2, 2), yp, num_classes=3)
    got = fpr_loss(zp, yp, zm, t.double(), alpha=1.0, entropic_scale=2.0)
    assert float(got) == pytest.approx(_fpr_loss_reference(zp, yp, zm, t, 1.0, e=2.0), abs=ATOL)
    with pytest.raises(ValueError, match="alpha"):
        fpr_loss(zp, yp, zm, t.double(), alpha=-0.1)


# ---------------------------------------------------------------------------
# scores
# ---------------------------------------------------------------------------


def _np_probs(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_scores_match_hand_written_formulas():
    torch.manual_seed(14)
    z = 2.0 * torch.randn(8, 5, dtype=torch.float64)
    zn = z.numpy()
    p = _np_probs(zn)
    h = -(p * np.log(p)).sum(axis=1)
    expected = {
        "mps": p.max(axis=1),
        "es": -h,
        "mds": zn.max(axis=1),
        "mmls": zn.max(axis=1) + zn.mean(axis=1),
        "mmles": zn.max(axis=1) + zn.mean(axis=1) - h,
    }
    fns = {"mps": mps, "es": es, "mds": mds, "mmls": mmls, "mmles": mmles}
    assert set(SCORES) == set(expected)
    for name, want in expected.items():
        np.testing.assert_allclose(fns[name](z).numpy(), want, atol=ATOL, rtol=0)
        np.testing.assert_allclose(SCORES[name](z).numpy(), want, atol=ATOL, rtol=0)
        np.testing.assert_allclose(score(name, z).numpy(), want, atol=ATOL, rtol=0)
        assert score(name, z).shape == (8,)


def test_mmles_equals_distance_form_at_unit_temperature():
    # z_j = -(d_j + dbar): max z = -(d_min + dbar), mean z = -2 dbar
    # => MMLES = -d_min - 3 dbar - H(P)
    head = _head(num_features=6, num_classes=5, seed=15, scale=3.1)
    torch.manual_seed(16)
    feats = torch.randn(10, 6, dtype=torch.float64)
    z = head(feats).detach()
    d = _explicit_distances(head, feats).numpy()
    p = _np_probs(-d)  # softmax(z) = softmax(-d)
    h = -(p * np.log(p)).sum(axis=1)
    expected = -d.min(axis=1) - 3.0 * d.mean(axis=1) - h
    np.testing.assert_allclose(mmles(z).numpy(), expected, atol=ATOL, rtol=0)
    np.testing.assert_allclose(mds(z).numpy(), -d.min(axis=1) - d.mean(axis=1), atol=ATOL, rtol=0)


def test_scores_orientation():
    confident = torch.tensor([[5.0, 0.0, 0.0]])
    uncertain = torch.tensor([[0.0, 0.0, 0.0]])
    for name in ("mps", "es", "mds", "mmls", "mmles"):
        assert float(score(name, confident)) > float(score(name, uncertain)), name


def test_score_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="mps, es, mds, mmls, mmles"):
        score("msp", torch.zeros(2, 3))


# ---------------------------------------------------------------------------
# temperature calibration
# ---------------------------------------------------------------------------


def _synthetic(t_true: float, n: int = 20_000, k: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    logits = 2.0 * rng.normal(size=(n, k))
    p = _np_probs(logits / t_true)
    labels = (p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return logits, labels


@pytest.mark.parametrize("t_true", [0.5, 2.0])
def test_calibration_recovers_known_temperature(t_true):
    logits, labels = _synthetic(t_true, seed=int(10 * t_true))
    t_nll = calibrate_temperature(logits, labels, objective="nll")
    t_ece = calibrate_temperature(logits, labels, objective="ece")
    assert isinstance(t_nll, float) and isinstance(t_ece, float)
    assert t_nll == pytest.approx(t_true, rel=0.05)
    assert t_ece == pytest.approx(t_true, rel=0.15)
    # the ECE at the found T is no worse than at T = 1 or at the true T (+ slack for the grid)
    e_found = ece(_np_probs(logits / t_ece), labels)
    assert e_found <= ece(_np_probs(logits), labels)
    assert e_found <= ece(_np_probs(logits / t_true), labels) + 0.002


def test_calibration_escapes_ece_plateau_at_t1():
    # saturated softmax at T = 1: margins of ~60 make every confidence round to exactly 1.0,
    # so ECE is constant near T = 1 and L-BFGS-B from T = 1 (finite differences) stops there
    rng = np.random.default_rng(6)
    n = 2000
    logits = 0.5 * rng.normal(size=(n, 10))
    logits[np.arange(n), rng.integers(0, 10, n)] += 60.0
    labels = (_np_probs(logits / 20.0).cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)

    def f(v):
        return ece(_np_probs(logits / float(v[0])), labels)

    plain = minimize(f, x0=[1.0], method="L-BFGS-B", bounds=[(0.001, 100.0)])
    assert float(plain.x[0]) == 1.0  # the stall that motivates the grid
    t = calibrate_temperature(logits, labels, objective="ece")
    assert f([t]) < 0.5 * f([1.0])
    assert t == pytest.approx(20.0, rel=0.15)
    assert calibrate_temperature(logits, labels, objective="nll") == pytest.approx(20.0, rel=0.05)


def test_calibration_accepts_tensors_and_keeps_t1_when_calibrated():
    logits, labels = _synthetic(1.0, n=5000, seed=4)
    t_np = calibrate_temperature(logits, labels, objective="nll")
    t_torch = calibrate_temperature(
        torch.from_numpy(logits).float(), torch.from_numpy(labels), "nll"
    )
    assert t_np == pytest.approx(1.0, rel=0.05)
    assert t_torch == pytest.approx(t_np, rel=1e-3)


def test_calibration_respects_bounds():
    logits, labels = _synthetic(2.0, n=5000, seed=5)
    t = calibrate_temperature(logits, labels, objective="nll", bounds=(0.1, 1.5))
    assert t == pytest.approx(1.5, abs=1e-6)  # optimum is outside, the bound is hit
    t = calibrate_temperature(logits, labels, objective="ece", bounds=(3.0, 10.0))
    assert 3.0 <= t <= 10.0


@pytest.mark.parametrize("bounds", [(0, 10), (5, 1), (-1, 2), (2, 2), (0.1, float("inf"))])
def test_calibration_bad_bounds(bounds):
    logits, labels = _synthetic(1.0, n=50)
    with pytest.raises(ValueError, match="bounds") as info:
        calibrate_temperature(logits, labels, bounds=bounds)
    assert repr(bounds) in str(info.value)


def test_calibration_bad_objective_and_inputs():
    logits, labels = _synthetic(1.0, n=50)
    with pytest.raises(ValueError, match="'brier'"):
        calibrate_temperature(logits, labels, objective="brier")
    with pytest.raises(ValueError, match="empty"):
        calibrate_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int))
    with pytest.raises(ValueError, match="mismatch"):
        calibrate_temperature(logits, labels[:-1])
    with pytest.raises(ValueError, match="targets"):
        calibrate_temperature(logits, labels + 10)


def test_score_parameter_sets_the_default_score():
    from ood_ray.methods import get_method

    assert get_method("dismax").default_score == "es"
    assert get_method("dismax", {"score": "mmles"}).default_score == "mmles"
    with pytest.raises(ValueError, match="dismax: score='maxlogit'; choose one of: mps, es, mds, mmls, mmles"):
        get_method("dismax", {"score": "maxlogit"})


def test_default_score_keeps_inputs_between_the_prototypes_out(digits_ood, tmp_path):
    """Why ES and not the paper's MMLES is the default (README "Results"): on digits-ood, faces and
    photos lie nearer the prototypes' centroid than digits, and MMLES's 3 x mean-distance term then
    scores them as ID. Validation split only; 15 epochs in this process, seed 0."""
    from ood_ray.config import TrainConfig
    from ood_ray.engine import train_local

    cfg = TrainConfig(method="dismax", data=str(digits_ood), epochs=15, num_workers=1, seed=0, evaluate_test=False)
    last = train_local(cfg, tmp_path)[-1]
    assert last["val_acc"] > 0.97
    es_auroc, mmles_auroc = last["val_auroc"], last["val_mmles_auroc"]
    assert es_auroc > 0.9, last  # the default score (es) is the unprefixed one
    assert es_auroc > mmles_auroc + 0.05, (es_auroc, mmles_auroc)
