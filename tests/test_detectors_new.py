"""``rmds``, ``nnguide`` and ``tempscale`` against independent re-derivations (NumPy, scikit-learn,
SciPy, loops per sample) and against pytorch-ood 0.4.0's ``RMD``, ``NNGuide`` and
``TemperatureScaling``, on small random features; CPU only, no Ray.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from pytorch_ood.detector import RMD, NNGuide, TemperatureScaling
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, logsumexp, softmax
from scipy.stats import spearmanr
from sklearn.covariance import EmpiricalCovariance
from torch import nn

from ood_ray.detectors import DETECTORS, DetectorError, make_detector
from ood_ray.detectors import nnguide as nnguide_module
from ood_ray.detectors import tempscale as tempscale_module

D, K, N, NQ = 16, 4, 240, 60


class ProtoHead(nn.Module):
    """A non-linear head: negative distances to fixed prototypes."""

    def __init__(self, d: int = D, k: int = K):
        super().__init__()
        self.prototypes = nn.Parameter(torch.randn(k, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return -torch.cdist(z, self.prototypes)


def setup(seed: int = 0, n: int = N, zero_column: bool = False):
    """Train features (non-negative, float64, with class structure), labels, queries, a linear head."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    centers = 2.0 * torch.rand(K, D, generator=g, dtype=torch.float64)
    z = (centers[y] + torch.randn(n, D, generator=g, dtype=torch.float64)).relu()
    q = (1.5 * torch.randn(NQ, D, generator=g, dtype=torch.float64) + 1.0).relu()
    if zero_column:  # a unit ReLU never lets through: singular covariances
        z[:, 3] = 0.0
        q[:, 3] = 0.0
    head = nn.Linear(D, K).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(K, D, generator=g, dtype=torch.float64))
        head.bias.copy_(torch.randn(K, generator=g, dtype=torch.float64))
    return z, y, q, head


def float32(head: nn.Linear) -> nn.Linear:
    out = nn.Linear(head.in_features, head.out_features)
    out.load_state_dict({k: v.float() for k, v in head.state_dict().items()})
    return out


def np_logits(z: torch.Tensor, head: nn.Module) -> np.ndarray:
    if isinstance(head, nn.Linear):
        w, b = head.weight.detach().numpy(), head.bias.detach().numpy()
        return np.stack([w @ zi + b for zi in z.numpy()])
    protos = head.prototypes.detach().numpy()
    return np.stack([[-np.linalg.norm(zi - p) for p in protos] for zi in z.numpy()])


def max_rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def assert_same(scores: torch.Tensor, ref, rtol: float = 1e-9, atol: float = 1e-12) -> None:
    ref = np.asarray(ref, dtype=np.float64)
    assert scores.dtype == torch.float64 and scores.shape == ref.shape
    np.testing.assert_allclose(scores.numpy(), ref, rtol=rtol, atol=atol)
    assert spearmanr(scores.numpy(), ref).statistic == pytest.approx(1.0)


def round_trip(det, head):
    buffer = io.BytesIO()
    torch.save(det.state(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ----------------------------------------------------------------- rmds
@pytest.mark.parametrize("zero_column", [False, True])
def test_rmds_matches_sklearn_empirical_covariance(zero_column):
    z, y, q, head = setup(1, zero_column=zero_column)
    zn, yn = z.numpy(), y.numpy()
    means = np.stack([zn[yn == c].mean(axis=0) for c in range(K)])
    within = EmpiricalCovariance(assume_centered=True).fit(zn - means[yn])  # biased (/N), pinvh
    background = EmpiricalCovariance().fit(zn)
    ref = []
    for qi in q.numpy():
        md0 = (qi - background.location_) @ background.precision_ @ (qi - background.location_)
        ref.append(max(-((qi - means[c]) @ within.precision_ @ (qi - means[c]) - md0) for c in range(K)))
    assert_same(make_detector("rmds").fit(z, y, head).score(q), ref, rtol=1e-8, atol=1e-8)


def test_rmds_is_mahalanobis_plus_the_background_distance():
    z, y, q, head = setup(2)
    mu0 = z.mean(0)
    prec0 = torch.linalg.inv(torch.cov(z.T, correction=0))
    md0 = torch.einsum("nd,de,ne->n", q - mu0, prec0, q - mu0)
    rmds = make_detector("rmds").fit(z, y, head).score(q)
    maha = make_detector("mahalanobis").fit(z, y, head).score(q)
    torch.testing.assert_close(rmds, maha + md0, rtol=1e-9, atol=1e-9)


def test_rmds_is_minus_n_times_pytorch_ood_rmd():
    """pytorch-ood's RMD divides neither scatter matrix by N (plus a 1e-6 ridge) and returns
    min_c (d_c − d_0): both precisions are N times ours, so ours = −N × theirs (float32 there)."""
    z, y, q, head = setup(3)
    ours = make_detector("rmds").fit(z, y, head).score(q).numpy()
    theirs = RMD(None).fit_features(z.float(), y).predict_features(q.float()).double().numpy()
    assert max_rel(-N * theirs, ours) < 1e-4  # measured 1.1e-5
    assert spearmanr(ours, -theirs).statistic > 0.9999
    assert not np.allclose(-theirs, ours, rtol=0.1)  # the factor N is real, not a tolerance artefact


def test_rmds_needs_every_class_and_two_samples():
    z, y, _, head = setup()
    with pytest.raises(DetectorError, match=r"detector 'rmds': classes with no training sample: \[1, 3\]"):
        make_detector("rmds").fit(z[:40], 2 * (torch.arange(40) % 2), head)
    with pytest.raises(DetectorError, match="'rmds'.*at least 2 training samples"):
        make_detector("rmds").fit(z[:1], y[:1], nn.Linear(D, 1).double())


# ----------------------------------------------------------------- nnguide
@pytest.mark.parametrize("k,proto", [(1, False), (7, False), (N, False), (10, True)])
def test_nnguide_matches_a_per_query_loop(k, proto):
    z, y, q, head = setup(4)
    head = ProtoHead() if proto else head
    bank = [zi / (np.linalg.norm(zi) + 1e-10) * logsumexp(li) for zi, li in zip(z.numpy(), np_logits(z, head), strict=True)]
    ref = []
    for qi, li in zip(q.numpy(), np_logits(q, head), strict=True):
        unit = qi / (np.linalg.norm(qi) + 1e-10)
        sims = sorted((float(unit @ b) for b in bank), reverse=True)
        ref.append(logsumexp(li) * np.mean(sims[:k]))
    assert_same(make_detector("nnguide", k=k).fit(z, y, head).score(q), ref)


def test_nnguide_chunks_give_the_same_scores(monkeypatch):
    z, y, q, head = setup(5)
    det = make_detector("nnguide", k=9).fit(z, y, head)
    whole = det.score(q)
    monkeypatch.setattr(nnguide_module, "MAX_ENTRIES", 3 * N)  # 3 queries per chunk; fit in chunks of 180 rows
    torch.testing.assert_close(make_detector("nnguide", k=9).fit(z, y, head).score(q), whole, rtol=1e-12, atol=1e-12)
    assert det.score(q[:1]).shape == (1,) and det.score(torch.zeros(2, D, dtype=torch.float64)).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("k", [1, 10, 100])
def test_nnguide_matches_pytorch_ood(k):
    z, y, q, head = setup(6)
    ours = make_detector("nnguide", k=k).fit(z, y, head).score(q).numpy()
    peer = NNGuide(None, float32(head), k=k).fit_features(z.float(), y)
    theirs = peer.predict_features(q.float()).double().numpy()  # an outlier score: −ours
    assert max_rel(-theirs, ours) < 1e-5  # float32 there; measured ≤ 2.3e-7
    assert spearmanr(ours, -theirs).statistic > 0.9999


def test_nnguide_grid_and_bank_size_checks():
    assert DETECTORS["nnguide"].grid() == [{"k": k} for k in (1, 10, 50, 100, 200, 500, 1000)]
    assert DETECTORS["nnguide"].grid(num_train=60) == [{"k": 1}, {"k": 10}, {"k": 50}]
    assert make_detector("nnguide").params == {"k": 100}
    z, y, q, head = setup(7)
    with pytest.raises(DetectorError, match=rf"^detector 'nnguide': k=300 must be <= the number of training samples N={N}$"):
        make_detector("nnguide", k=300).fit(z, y, head)
    det = make_detector("nnguide", k=5).fit(z, y, head)
    small = {**det.state(), "bank": det.state()["bank"][:3]}
    again = make_detector("nnguide", k=5)
    with pytest.raises(DetectorError, match=r"^detector 'nnguide': k=5 must be <= the number of training samples N=3$"):
        again.restore(small, head)
    with pytest.raises(DetectorError, match="not fitted"):
        again.score(q)
    assert make_detector("nnguide", k=3).restore(small, head).score(q).shape == (NQ,)


# ----------------------------------------------------------------- tempscale
def calibration_set(seed: int, n: int = 300, t_true: float = 2.0):
    """Val features whose labels are drawn from softmax(logits / t_true): the NLL minimum is near t_true."""
    z, _, q, head = setup(seed, n=n)
    logits = np_logits(z, head)
    rng = np.random.default_rng(seed)
    y = torch.tensor([rng.choice(K, p=softmax(row / t_true)) for row in logits])
    return z, y, q, head, logits


def np_nll(logits: np.ndarray, y: np.ndarray, t: float) -> float:
    return float(-log_softmax(logits / t, axis=1)[np.arange(len(y)), y].mean())


@pytest.mark.parametrize("seed,t_true", [(8, 2.0), (9, 0.5), (10, 1.0)])
def test_tempscale_minimises_the_nll_like_scipy(seed, t_true):
    z, y, q, head, logits = calibration_set(seed, t_true=t_true)
    yn = y.numpy()
    res = minimize_scalar(lambda s: np_nll(logits, yn, np.exp(s)), bounds=(np.log(1e-3), np.log(1e3)), method="bounded", options={"xatol": 1e-10})
    t_ref = float(np.exp(res.x))
    det = make_detector("tempscale").fit(z, y, head)
    assert det.temperature == pytest.approx(t_ref, rel=1e-6)
    assert 0.5 * t_true < det.temperature < 2 * t_true
    assert np_nll(logits, yn, det.temperature) <= res.fun + 1e-12
    assert_same(det.score(q), softmax(np_logits(q, head) / det.temperature, axis=1).max(axis=1))
    again = make_detector("tempscale").fit(z, y, head)
    assert again.temperature == det.temperature  # deterministic to the bit
    assert det.fitted() == {"T": det.temperature} and make_detector("msp").fit(z, y, head).fitted() == {}


def test_tempscale_falls_back_to_t1_without_a_finite_minimum():
    z, _, q, head, logits = calibration_set(11)
    msp = make_detector("msp").fit(z, torch.zeros(len(z), dtype=torch.long), head).score(q)
    for labels in (logits.argmax(1), logits.argmin(1)):  # all correct (T → 0), worse than chance (T → ∞)
        det = make_detector("tempscale").fit(z, torch.from_numpy(labels), head)
        assert det.temperature == 1.0
        torch.testing.assert_close(det.score(q), msp)
    flat = nn.Linear(D, K).double()
    nn.init.zeros_(flat.weight)
    nn.init.zeros_(flat.bias)
    assert make_detector("tempscale").fit(z, torch.arange(len(z)) % K, flat).temperature == 1.0


def test_tempscale_vs_pytorch_ood_and_a_converged_lbfgs():
    """pytorch-ood (as OpenOOD) runs LBFGS(lr=0.01, max_iter=50) without line search from T = 1:
    it stops between 1 and the minimiser. With its T our score is exactly −its score, and an
    LBFGS run to convergence (strong Wolfe line search) reaches our T."""
    z, y, q, head, logits = calibration_set(12, t_true=3.0)
    det = make_detector("tempscale").fit(z, y, head)
    peer = TemperatureScaling(None).fit_logits(float32(head)(z.float()).detach(), y)
    t_peer = float(peer.t.detach())
    assert 1.0 < t_peer < det.temperature  # measured 1.23 vs 3.20
    assert np_nll(logits, y.numpy(), det.temperature) < np_nll(logits, y.numpy(), t_peer)
    state = {**det.state(), "temperature": torch.tensor([t_peer], dtype=torch.float64)}
    with_peer_t = make_detector("tempscale").restore(state, head).score(q).numpy()
    theirs = peer.predict_logits(float32(head)(q.float()).detach()).detach().double().numpy()
    assert max_rel(-theirs, with_peer_t) < 1e-6  # measured 2.1e-7 (float32 there)
    ours = det.score(q).numpy()
    assert spearmanr(ours, -theirs).statistic > 0.9  # measured 0.957: T changes the MSP ranking (K > 2)

    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    lbfgs = torch.optim.LBFGS([log_t], lr=1.0, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe")
    lt, yt = torch.from_numpy(logits), y

    def closure():
        lbfgs.zero_grad()
        loss = nn.functional.cross_entropy(lt / log_t.exp(), yt)
        loss.backward()
        return loss

    lbfgs.step(closure)
    assert float(log_t.detach().exp()) == pytest.approx(det.temperature, rel=1e-6)


def test_tempscale_is_fitted_on_val_and_restore_checks_t():
    assert DETECTORS["tempscale"].fit_split == "val"
    assert DETECTORS["tempscale"].grid() == [{}] and DETECTORS["tempscale"].defaults == {}
    z, y, q, head, _ = calibration_set(13)
    det = make_detector("tempscale").fit(z, y, head)
    assert det.state()["temperature"].shape == (1,)
    for bad, pattern in (
        (torch.tensor([0.0]), r"^detector 'tempscale': state temperature must hold one value > 0, got \[0.0\]$"),
        (torch.tensor([-2.0]), r"state temperature must hold one value > 0"),
        (torch.tensor([1.0, 2.0]), r"state temperature must hold one value > 0"),
        (torch.tensor([float("nan")]), r"state temperature holds 1 NaN"),
        (torch.tensor(2.0), r"state temperature has shape \(\)"),
        (torch.tensor([2]), r"state temperature must be a floating-point tensor"),
    ):
        with pytest.raises(DetectorError, match=pattern):
            make_detector("tempscale").restore({**det.state(), "temperature": bad}, head)
    with pytest.raises(DetectorError, match="not fitted"):
        _ = make_detector("tempscale").temperature
    # the bisection bracket and tolerance are what the docstring says
    assert (tempscale_module.T_MIN, tempscale_module.T_MAX, tempscale_module.TOL) == (1e-3, 1e3, 1e-12)


# ----------------------------------------------------------------- contract: all three
def test_every_detector_declares_a_valid_fit_split():
    for name, cls in DETECTORS.items():
        assert cls.fit_split in ("train", "val"), name
    assert {n for n in ("rmds", "nnguide", "tempscale") if DETECTORS[n].fit_split == "val"} == {"tempscale"}
    assert not any(DETECTORS[n].needs_linear_head or DETECTORS[n].needs_model for n in ("rmds", "nnguide", "tempscale"))


@pytest.mark.parametrize("name,params", [("rmds", {}), ("nnguide", {"k": 20}), ("tempscale", {})])
@pytest.mark.parametrize("proto", [False, True])
def test_state_restore_round_trip(name, params, proto):
    z, y, q, head = setup(14)
    head = ProtoHead() if proto else head
    det = make_detector(name, **params).fit(z, y, head)
    state = det.state()
    assert set(state) == {*DETECTORS[name].state_keys, "feature_dim", "num_classes"}
    assert all(v.device.type == "cpu" for v in state.values())
    again = make_detector(name, **params).restore(round_trip(det, head), head, feature_dim=D)
    torch.testing.assert_close(again.score(q), det.score(q), rtol=0, atol=0)
    with pytest.raises(DetectorError, match=r"state feature_dim=16 but the model has D=8"):
        make_detector(name, **params).restore(state, head, feature_dim=8)


def test_restore_refuses_a_statistic_of_the_wrong_shape():
    z, y, _, head = setup(15)
    state = make_detector("rmds").fit(z, y, head).state()
    with pytest.raises(DetectorError, match=r"state background_precision has shape \(16, 15\), expected \(16, 16\)"):
        make_detector("rmds").restore({**state, "background_precision": state["background_precision"][:, :-1]}, head)
    without = {k: v for k, v in state.items() if k != "background_mean"}
    with pytest.raises(DetectorError, match="lacks background_mean"):
        make_detector("rmds").restore(without, head)
    with pytest.raises(DetectorError, match="lacks background_mean"):  # a mahalanobis state is not enough
        make_detector("rmds").restore(make_detector("mahalanobis").fit(z, y, head).state(), head)


@pytest.mark.parametrize(
    "name,params,pattern",
    [
        ("nnguide", {"k": 0}, r"^detector 'nnguide': k=0 must be >= 1$"),
        ("nnguide", {"k": -3}, r"^detector 'nnguide': k=-3 must be >= 1$"),
        ("nnguide", {"k": True}, r"^detector 'nnguide': k=True must be an int$"),
        ("nnguide", {"k": 2.5}, r"^detector 'nnguide': k=2.5 must be an int$"),
        ("nnguide", {"kk": 3}, r"^detector 'nnguide': unknown parameter\(s\) kk=3; its parameters: k$"),
        ("rmds", {"k": 3}, r"^detector 'rmds': unknown parameter\(s\) k=3; its parameters: none$"),
        ("tempscale", {"temperature": 2.0}, r"^detector 'tempscale': unknown parameter\(s\) temperature=2.0; its parameters: none$"),
    ],
)
def test_bad_parameters_give_one_line_errors_naming_them(name, params, pattern):
    with pytest.raises(DetectorError, match=pattern) as info:
        make_detector(name, **params)
    assert "\n" not in str(info.value)
