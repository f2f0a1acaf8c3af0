"""Post-hoc detectors (``ood_ray.detectors``) against independent re-derivations, on CPU without Ray.

Each reference below is written differently from the package (NumPy/SciPy/scikit-learn, loops
per sample or per class), on small random non-negative features and a random linear head.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors
from torch import nn

from ood_ray.detectors import DETECTORS, Detector, DetectorError, make_detector
from ood_ray.detectors import knn as knn_module
from ood_ray.detectors.base import percentile

NAMES = ["msp", "maxlogit", "energy", "gen", "odin", "mahalanobis", "knn", "vim", "react", "ash", "scale", "fdbd", "rmds", "nnguide", "tempscale", "nac"]
LINEAR_ONLY = {"vim", "fdbd", "react", "ash", "scale"}
D, K, N, NQ = 24, 5, 200, 50


class ProtoHead(nn.Module):
    """A non-linear head: negative distances to learnable prototypes (DisMax-like)."""

    def __init__(self, d: int, k: int):
        super().__init__()
        self.prototypes = nn.Parameter(torch.randn(k, d, generator=torch.Generator().manual_seed(7), dtype=torch.float64))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return -torch.cdist(z, self.prototypes)


def setup(seed: int = 0, d: int = D, k: int = K, n: int = N, nq: int = NQ):
    """Train features, labels, queries (non-negative, float64) and a random linear head."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=torch.float64).relu()
    y = torch.arange(n) % k  # every class present
    q = (torch.randn(nq, d, generator=g, dtype=torch.float64) * 1.5).relu()
    head = nn.Linear(d, k).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(k, d, generator=g, dtype=torch.float64))
        head.bias.copy_(torch.randn(k, generator=g, dtype=torch.float64))
    return z, y, q, head


def np_logits(z: torch.Tensor, head: nn.Linear) -> np.ndarray:
    w, b = head.weight.detach().numpy(), head.bias.detach().numpy()
    return np.stack([w @ zi + b for zi in z.numpy()])


def assert_same(scores: torch.Tensor, ref, rtol: float = 1e-7, atol: float = 1e-9) -> None:
    """Equal values and the same ranking (Spearman 1) as the reference."""
    ref = np.asarray(ref, dtype=np.float64)
    assert scores.dtype == torch.float64 and scores.shape == ref.shape
    np.testing.assert_allclose(scores.numpy(), ref, rtol=rtol, atol=atol)
    assert spearmanr(scores.numpy(), ref).statistic == pytest.approx(1.0)


def fitted(name: str, seed: int = 0, **params) -> tuple[Detector, torch.Tensor, nn.Linear]:
    z, y, q, head = setup(seed)
    return make_detector(name, **params).fit(z, y, head), q, head


# ----------------------------------------------------------------- logit-only detectors
def test_msp_maxlogit_energy_gen_match_per_sample_formulas():
    z, y, q, head = setup(1)
    logits = np_logits(q, head)
    msp = [max(math.exp(v - max(row)) for v in row) / sum(math.exp(v - max(row)) for v in row) for row in logits]
    assert_same(make_detector("msp").fit(z, y, head).score(q), msp)
    assert_same(make_detector("maxlogit").fit(z, y, head).score(q), [max(row) for row in logits])
    for t in (1.0, 2.5):
        ref = [t * math.log(sum(math.exp(v / t) for v in row)) for row in logits]
        assert_same(make_detector("energy", temperature=t).fit(z, y, head).score(q), ref)
    for gamma, m in ((0.1, 100), (0.5, 3), (0.01, 1)):
        ref = []
        for row in logits:
            e = np.exp(row - row.max())
            p = sorted(e / e.sum(), reverse=True)[: min(m, K)]
            ref.append(-sum(pi**gamma * (1 - pi) ** gamma for pi in p))
        assert_same(make_detector("gen", gamma=gamma, top_m=m).fit(z, y, head).score(q), ref)


# ----------------------------------------------------------------- ODIN
def odin_model(seed: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, K)).double()


@pytest.mark.parametrize("temperature,epsilon", [(1000.0, 0.0014), (1.0, 0.05), (10.0, 0.0)])
def test_odin_matches_explicit_autograd(temperature, epsilon):
    model = odin_model()
    images = torch.randn(20, 3, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    z, y, _, head = setup(2)
    det = make_detector("odin", temperature=temperature, epsilon=epsilon).fit(z, y, head, model=model)
    with torch.no_grad():  # ODIN enables grad itself
        scores = det.score(images)
    assert all(p.grad is None for p in model.parameters()), "ODIN must not leave gradients on the model"
    ref = []
    for img in images:  # one image at a time: CE against the predicted class, then a step of −ε·sign
        x = img.unsqueeze(0).clone().requires_grad_(True)
        out = model(x)
        loss = nn.functional.cross_entropy(out / temperature, out.argmax(1).detach())
        loss.backward()
        x_tilde = x.detach() - epsilon * x.grad.sign()
        ref.append(float(torch.softmax(model(x_tilde) / temperature, 1).max().detach()))
    assert_same(scores, ref, rtol=1e-10)


def test_odin_without_perturbation_is_temperature_scaled_msp():
    model = odin_model()
    images = torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    z, y, _, head = setup(2)
    det = make_detector("odin", temperature=10.0, epsilon=0.0).fit(z, y, head, model=model)
    with torch.no_grad():
        expected = torch.softmax(model(images) / 10.0, dim=1).amax(1)
    torch.testing.assert_close(det.score(images), expected)
    # and the perturbation raises the ID score of every sample (it ascends log S_ŷ)
    perturbed = make_detector("odin", temperature=10.0, epsilon=0.01).fit(z, y, head, model=model)
    assert bool((perturbed.score(images) >= det.score(images)).all())
    with torch.inference_mode():  # ODIN leaves inference mode for its gradient pass
        inside = perturbed.score(images.clone())
    torch.testing.assert_close(inside, perturbed.score(images))


def test_odin_needs_a_model_and_images():
    z, y, _, head = setup()
    with pytest.raises(DetectorError, match="model="):
        make_detector("odin").fit(z, y, head)
    det = make_detector("odin").fit(z, y, head, model=odin_model())
    with pytest.raises(DetectorError, match="images"):
        det.score(torch.randn(3))


# ----------------------------------------------------------------- feature-statistics detectors
def test_mahalanobis_matches_numpy():
    z, y, q, head = setup(3)
    zn, yn = z.numpy(), y.numpy()
    means = np.stack([zn[yn == c].mean(axis=0) for c in range(K)])
    cov = sum(np.outer(zi - means[yi], zi - means[yi]) for zi, yi in zip(zn, yn, strict=True)) / N
    prec = np.linalg.pinv(cov, hermitian=True)
    ref = [max(-(qi - means[c]) @ prec @ (qi - means[c]) for c in range(K)) for qi in q.numpy()]
    assert_same(make_detector("mahalanobis").fit(z, y, head).score(q), ref, rtol=1e-9)


@pytest.mark.parametrize("k", [1, 5, 50])
def test_knn_matches_sklearn(k):
    z, y, q, head = setup(4)
    bank = z.numpy() / (np.linalg.norm(z.numpy(), axis=1, keepdims=True) + 1e-10)
    queries = q.numpy() / (np.linalg.norm(q.numpy(), axis=1, keepdims=True) + 1e-10)
    dist, _ = NearestNeighbors(n_neighbors=k).fit(bank).kneighbors(queries)
    assert_same(make_detector("knn", k=k).fit(z, y, head).score(q), -dist[:, -1], rtol=1e-9)


def test_knn_chunks_give_the_same_scores(monkeypatch):
    det, q, _ = fitted("knn", k=7)
    whole = det.score(q)
    monkeypatch.setattr(knn_module, "MAX_ENTRIES", 3 * N)  # 3 queries per chunk
    torch.testing.assert_close(det.score(q), whole)


@pytest.mark.parametrize("dim", [0, 5, 20])
def test_vim_matches_numpy(dim):
    z, y, q, head = setup(5)
    w, b = head.weight.detach().numpy(), head.bias.detach().numpy()
    u = -np.linalg.pinv(w) @ b
    centered = z.numpy() - u
    values, vectors = np.linalg.eig(centered.T @ centered / N)
    order = np.argsort(-values.real)
    ns = vectors.real[:, order[dim or D // 2 :]]
    vlogit = np.linalg.norm(centered @ ns, axis=1)
    alpha = np_logits(z, head).max(axis=1).mean() / vlogit.mean()
    ref = logsumexp(np_logits(q, head), axis=1) - alpha * np.linalg.norm((q.numpy() - u) @ ns, axis=1)
    assert_same(make_detector("vim", dim=dim).fit(z, y, head).score(q), ref, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("p", [75.0, 90.0, 100.0])
def test_react_matches_numpy(p):
    z, y, q, head = setup(6)
    c = np.percentile(z.numpy().ravel(), p)
    ref = logsumexp(np_logits(torch.from_numpy(np.minimum(q.numpy(), c)), head), axis=1)
    det = make_detector("react", percentile=p).fit(z, y, head)
    assert float(det.state()["threshold"]) == pytest.approx(c, rel=1e-12)
    assert_same(det.score(q), ref)


def test_percentile_matches_numpy():
    values = torch.randn(37, 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for q in (0.0, 12.5, 50.0, 87.3, 100.0):
        assert float(percentile(values, q)) == pytest.approx(np.percentile(values.numpy(), q), rel=1e-12)


def keep_count(d: int, p: float) -> int:
    return max(1, d - int(np.round(d * p / 100.0)))


@pytest.mark.parametrize("p", [0.0, 65.0, 90.0, 99.0])
def test_ash_matches_per_sample_loop(p):
    z, y, q, head = setup(7)
    shaped = []
    for row in q.numpy():
        keep = np.argsort(-row, kind="stable")[: keep_count(D, p)]
        kept = np.zeros_like(row)
        kept[keep] = row[keep]
        shaped.append(kept * math.exp(row.sum() / kept.sum()))
    ref = logsumexp(np_logits(torch.from_numpy(np.stack(shaped)), head), axis=1)
    assert_same(make_detector("ash", percentile=p).fit(z, y, head).score(q), ref, rtol=1e-9)


@pytest.mark.parametrize("p", [0.0, 65.0, 85.0, 99.0])
def test_scale_matches_per_sample_loop(p):
    z, y, q, head = setup(8)
    scaled = []
    for row in q.numpy():
        top = sorted(row, reverse=True)[: keep_count(D, p)]
        scaled.append(row * math.exp(row.sum() / sum(top)))
    ref = logsumexp(np_logits(torch.from_numpy(np.stack(scaled)), head), axis=1)
    assert_same(make_detector("scale", percentile=p).fit(z, y, head).score(q), ref, rtol=1e-9)


def test_ash_and_scale_handle_an_all_zero_sample():
    det_a, _, _ = fitted("ash")
    det_s, _, _ = fitted("scale")
    zero = torch.zeros(1, D, dtype=torch.float64)
    assert torch.isfinite(det_a.score(zero)).all() and torch.isfinite(det_s.score(zero)).all()


def test_fdbd_matches_explicit_boundary_distances():
    z, y, q, head = setup(9)
    w, b = head.weight.detach().numpy(), head.bias.detach().numpy()
    mu = z.numpy().mean(axis=0)
    ref = []
    for zi in q.numpy():
        pred = int(np.argmax(w @ zi + b))
        dists = [abs((w[pred] - w[c]) @ zi + b[pred] - b[c]) / np.linalg.norm(w[pred] - w[c]) for c in range(K) if c != pred]
        ref.append(np.mean(dists) / np.linalg.norm(zi - mu))
    assert_same(make_detector("fdbd").fit(z, y, head).score(q), ref, rtol=1e-9)


# ----------------------------------------------------------------- sign: higher = in-distribution
def separable(seed: int = 11, n: int = 400, nq: int = 200):
    """ID: 4 classes, each a block of 4 strong activations on a floor of ones; OOD: one small spike.

    The head is the nearest-class-mean linear classifier of the block means, as a trained
    network's head would roughly be; images for ODIN are the features themselves (1×4×4).
    """
    d, k = 16, 4
    g = torch.Generator().manual_seed(seed)
    blocks = torch.zeros(k, d, dtype=torch.float64)
    for c in range(k):
        blocks[c, 4 * c : 4 * c + 4] = 3.0
    y = torch.arange(n) % k
    z = (1.0 + blocks[y] + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)).relu()
    yq = torch.arange(nq) % k
    id_q = (1.0 + blocks[yq] + 0.3 * torch.randn(nq, d, generator=g, dtype=torch.float64)).relu()
    ood_q = (0.3 * torch.randn(nq, d, generator=g, dtype=torch.float64)).relu()
    ood_q[torch.arange(nq), torch.randint(0, d, (nq,), generator=g)] += 2.0
    head = nn.Linear(d, k).double()
    with torch.no_grad():
        head.weight.copy_(blocks)
        head.bias.copy_(-(blocks**2).sum(1) / 2)
    model = nn.Sequential(nn.Flatten(), head)
    return z, y, id_q, ood_q, head, model


@pytest.mark.parametrize("name", NAMES)
def test_scores_are_higher_for_in_distribution(name):
    z, y, id_q, ood_q, head, model = separable()
    det = make_detector(name).fit(z, y, head, model=model)
    if name == "odin":
        id_q, ood_q = id_q.reshape(-1, 1, 4, 4), ood_q.reshape(-1, 1, 4, 4)
    scores = torch.cat([det.score(id_q), det.score(ood_q)]).numpy()
    truth = np.r_[np.ones(len(id_q)), np.zeros(len(ood_q))]
    assert roc_auc_score(truth, scores) > 0.9, name


@pytest.mark.parametrize("name", ["mahalanobis", "knn"])
def test_distance_detectors_flag_shifted_clusters(name):
    z, y, id_q, _, head, _ = separable(12)
    shifted = id_q.roll(2, dims=1) * 1.5  # class structure kept, moved away from every cluster
    det = make_detector(name).fit(z, y, head)
    scores = torch.cat([det.score(id_q), det.score(shifted)]).numpy()
    assert roc_auc_score(np.r_[np.ones(len(id_q)), np.zeros(len(shifted))], scores) > 0.9


# ----------------------------------------------------------------- registry and parameters
def test_registry_lists_all_detectors_in_order():
    assert list(DETECTORS) == NAMES
    for name, cls in DETECTORS.items():
        assert issubclass(cls, Detector) and cls.name == name
        assert cls.needs_linear_head == (name in LINEAR_ONLY)
        assert cls.needs_model == (name == "odin")
        assert make_detector(name).params == cls.defaults
    assert issubclass(DetectorError, ValueError)


def test_unknown_detector_names_itself_and_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown detector 'nope'.*msp.*knn.*fdbd"):
        make_detector("nope")


@pytest.mark.parametrize(
    "name,params,pattern",
    [
        ("knn", {"kk": 3}, r"'knn'.*kk=3.*parameters: k"),
        ("msp", {"temperature": 2.0}, r"'msp'.*temperature"),
        ("knn", {"k": 0}, r"detector 'knn': k=0 must be >= 1"),
        ("knn", {"k": True}, r"k=True must be an int"),
        ("knn", {"k": 2.5}, r"k=2.5 must be an int"),
        ("react", {"percentile": 150}, r"percentile=150.0 must lie in \(0, 100\]"),
        ("react", {"percentile": 0}, r"percentile=0.0"),
        ("ash", {"percentile": 100.0}, r"percentile=100.0 must lie in \[0, 100\)"),
        ("scale", {"percentile": -1}, r"percentile=-1.0"),
        ("gen", {"gamma": 0.0}, r"gamma=0.0 must be > 0"),
        ("gen", {"gamma": -1}, r"gamma=-1.0"),
        ("gen", {"top_m": 0}, r"top_m=0 must be >= 1"),
        ("energy", {"temperature": float("nan")}, r"temperature=nan must be finite"),
        ("odin", {"epsilon": -0.1}, r"epsilon=-0.1 must be >= 0"),
        ("odin", {"temperature": "big"}, r"temperature='big' must be a number"),
        ("vim", {"dim": -1}, r"dim=-1"),
    ],
)
def test_bad_parameters_name_the_parameter(name, params, pattern):
    with pytest.raises(ValueError, match=pattern):
        make_detector(name, **params)


def test_floats_accept_ints_and_numpy_numbers():
    assert make_detector("react", percentile=95).params == {"percentile": 95.0}
    assert make_detector("knn", k=np.int64(3)).params == {"k": 3}
    assert type(make_detector("knn", k=np.int64(3)).params["k"]) is int


def test_fit_time_errors_name_the_sizes():
    z, y, q, head = setup()
    with pytest.raises(DetectorError, match=r"dim=24 must satisfy 1 <= dim < D with D=24"):
        make_detector("vim", dim=D).fit(z, y, head)
    with pytest.raises(DetectorError, match=r"k=300 must be <= the number of training samples N=200"):
        make_detector("knn", k=300).fit(z, y, head)
    with pytest.raises(DetectorError, match=r"classes with no training sample: \[1, 3, 4\] \(the head has K=5"):
        make_detector("mahalanobis").fit(z[:40], 2 * (torch.arange(40) % 2), head)
    with pytest.raises(DetectorError, match="at least 2 training samples"):
        make_detector("mahalanobis").fit(z[:1], y[:1], nn.Linear(D, 1).double())
    with pytest.raises(DetectorError, match=r"D=24 but the head expects in_features=10"):
        make_detector("fdbd").fit(z, y, nn.Linear(10, K).double())
    with pytest.raises(DetectorError, match="200 rows but labels has 199"):
        make_detector("msp").fit(z, y[:-1], head)
    with pytest.raises(DetectorError, match="labels must lie in"):
        make_detector("msp").fit(z, y + K, head)
    with pytest.raises(DetectorError, match="non-finite"):
        make_detector("knn").fit(torch.where(z > 2, float("nan"), z), y, head)
    with pytest.raises(DetectorError, match="2-D"):
        make_detector("knn").fit(z[0], y, head)


def test_score_before_fit_and_wrong_dimension():
    with pytest.raises(DetectorError, match=r"detector 'knn' is not fitted: call fit\(features, labels, head\) first"):
        make_detector("knn").score(torch.rand(3, D))
    for name in NAMES:
        if name == "odin":
            continue
        det, _, _ = fitted(name, k=5) if name == "knn" else fitted(name)
        with pytest.raises(DetectorError, match=r"fitted on D=24 features but score got D=10"):
            det.score(torch.rand(3, 10, dtype=torch.float64))
        assert det.score(torch.empty(0, D, dtype=torch.float64)).shape == (0,)


def test_linear_head_detectors_refuse_other_heads_and_the_others_accept_them():
    z, y, q, _ = setup()
    head = ProtoHead(D, K)
    for name in NAMES:
        det = make_detector(name)
        if name in LINEAR_ONLY:
            with pytest.raises(DetectorError, match=rf"detector '{name}' needs a linear classification head \(nn.Linear\); this model's head is ProtoHead — use one of: msp, maxlogit, energy, gen, odin, mahalanobis, knn, rmds, nnguide, tempscale, nac$"):
                det.fit(z, y, head)
        else:
            model = nn.Sequential(nn.Flatten(), nn.Linear(D, K).double())
            det.fit(z, y, head, model=model)
            scores = det.score(q.reshape(NQ, 1, D) if name == "odin" else q)
            assert scores.shape == (NQ,) and bool(torch.isfinite(scores).all())
    # the logits come from the head itself
    expected = torch.softmax(head(q), 1).amax(1)
    torch.testing.assert_close(make_detector("msp").fit(z, y, head).score(q), expected)


def test_float32_inputs_give_float64_scores_close_to_float64_ones():
    z, y, q, head = setup(13)
    head32 = nn.Linear(D, K)
    head32.load_state_dict({k: v.float() for k, v in head.state_dict().items()})
    for name in NAMES:
        if name == "odin":
            continue
        s64 = make_detector(name).fit(z, y, head).score(q)
        s32 = make_detector(name).fit(z.float(), y, head32).score(q.float())
        assert s32.dtype == torch.float64
        torch.testing.assert_close(s32, s64, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------- grid
def test_grids():
    expected = {
        "msp": [{}], "maxlogit": [{}], "energy": [{}], "mahalanobis": [{}], "fdbd": [{}], "vim": [{}],
        "knn": [{"k": k} for k in (1, 5, 10, 50, 100, 200)],
        "react": [{"percentile": p} for p in (85.0, 90.0, 95.0, 99.0)],
        "ash": [{"percentile": p} for p in (65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0)],
        "scale": [{"percentile": p} for p in (65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0)],
    }
    for name, grid in expected.items():
        assert DETECTORS[name].grid() == grid, name
    assert len(DETECTORS["odin"].grid()) == 16 and {"temperature": 1000.0, "epsilon": 0.0014} in DETECTORS["odin"].grid()
    assert len(DETECTORS["gen"].grid()) == 12
    assert DETECTORS["gen"].grid(num_classes=10) == [{"gamma": g, "top_m": 10} for g in (0.01, 0.05, 0.1, 0.5)]
    assert DETECTORS["knn"].grid(num_train=20) == [{"k": k} for k in (1, 5, 10)]
    assert DETECTORS["vim"].grid(feature_dim=16) == [{"dim": 4}, {"dim": 8}, {"dim": 12}]
    assert DETECTORS["vim"].grid(feature_dim=2) == [{"dim": 1}]
    z, y, _, head = setup()
    for name, cls in DETECTORS.items():  # every candidate builds and fits
        for point in cls.grid(feature_dim=D, num_classes=K, num_train=N):
            make_detector(name, **point).fit(z, y, head, model=odin_model())


# ----------------------------------------------------------------- state / restore
@pytest.mark.parametrize("name", NAMES)
def test_state_restore_round_trip(name):
    z, y, q, head = setup(14)
    model = odin_model()
    params = {"k": 5} if name == "knn" else {}
    det = make_detector(name, **params).fit(z, y, head, model=model)
    state = det.state()
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in state.values())
    assert not any(v is p for v in state.values() for p in head.parameters())
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    again = make_detector(name, **params).restore(loaded, head, model=model)
    x = torch.randn(NQ, 3, 4, 4, dtype=torch.float64) if name == "odin" else q
    torch.testing.assert_close(again.score(x), det.score(x), rtol=0, atol=0)


def test_restore_checks_the_state_and_the_parameters():
    det, _, head = fitted("react", percentile=95.0)
    with pytest.raises(DetectorError, match=r"fitted with percentile=95.0 but this detector has percentile=90.0"):
        make_detector("react").restore(det.state(), head)
    with pytest.raises(DetectorError, match="lacks bank"):
        make_detector("knn").restore(det.state(), head)
    with pytest.raises(DetectorError, match=r"D=24, K=5 but the head is nn.Linear\(24, 3\)"):
        make_detector("react", percentile=95.0).restore(det.state(), nn.Linear(D, 3))
    with pytest.raises(DetectorError, match="needs a linear classification head"):
        make_detector("react", percentile=95.0).restore(det.state(), ProtoHead(D, K))
    knn, _, _ = fitted("knn", k=5)
    small = {**knn.state(), "bank": knn.state()["bank"][:3]}
    with pytest.raises(DetectorError, match="k=5 must be <= the number of training samples N=3"):
        make_detector("knn", k=5).restore(small, head)
