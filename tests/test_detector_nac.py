"""NAC-UE: its states and coverage against a per-neuron re-derivation, against pytorch-ood's
``NACUE``, the layer rule, its saved state, and the whole path (training, checkpoint, evaluate)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from ood_ray import metric_names as names
from ood_ray.detectors import DETECTORS, DetectorError, make_detector
from ood_ray.detectors.layers import choose_layers
from ood_ray.models import Classifier, build_backbone


class TinyCNN(nn.Module):
    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = 4
        self.to(dtype)

    def forward(self, x):
        return torch.flatten(self.pool(self.features(x)), 1)


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU())
        self.num_features = 5

    def forward(self, x):
        return self.features(x)


def tiny_cnn(seed=0):
    torch.manual_seed(seed)
    return Classifier(TinyCNN(), nn.Linear(4, 3).double()).eval()


def edges_np(m: int) -> np.ndarray:
    """OpenOOD's ``logspace(1e3, M)``, written out again."""
    x = np.emath.logn(1000.0, np.linspace(1.0, 1000.0**0.5, m // 2))
    e = np.r_[x[:-1], (1.0 - x)[::-1]]
    e[-1] += 0.01
    return np.r_[e, 1.2]


def kl_uniform(logits: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(logits, dim=-1)
    u = torch.full_like(p, 1.0 / p.shape[-1])
    return (u * (u.log() - p.log())).sum(-1)


def oracle_probes(model: Classifier, x: torch.Tensor) -> list[np.ndarray]:
    """Per sample: the first ReLU's map a and ∂KL/∂a by autograd.functional, then mean(a)·Σg;
    the features z and ∂KL/∂z the same way."""
    f = model.backbone.features
    first, rest = f[:2], lambda a: model.head(model.backbone.pool(f[2:](a)).flatten(1))
    out1, out2 = [], []
    for xi in x:
        a = first(xi[None])[0]
        g = torch.autograd.functional.jacobian(lambda v: kl_uniform(rest(v[None]))[0], a)
        out1.append((a.mean(dim=(1, 2)) * g.sum(dim=(1, 2))).detach().numpy())
        z = model.backbone(xi[None])[0]
        gz = torch.autograd.functional.jacobian(lambda v: kl_uniform(model.head(v[None]))[0], z)
        out2.append((z * gz).detach().numpy())
    return [np.asarray(out1, dtype=np.float32).astype(np.float64), np.asarray(out2, dtype=np.float32).astype(np.float64)]


def oracle_scores(train: list[np.ndarray], test: list[np.ndarray], alpha: float, m: int, r: float) -> np.ndarray:
    e = edges_np(m)
    per_layer = []
    for p_tr, p_te in zip(train, test, strict=True):
        scale = np.abs(p_tr).mean()
        s_tr, s_te = 1 / (1 + np.exp(-alpha * p_tr / scale)), 1 / (1 + np.exp(-alpha * p_te / scale))
        cov = np.zeros_like(s_te)
        for c in range(p_tr.shape[1]):  # one neuron at a time
            hist, _ = np.histogram(s_tr[:, c], bins=e)
            for i, s in enumerate(s_te[:, c]):
                cov[i, c] = min(hist[np.searchsorted(e, s, side="right") - 1] / (r * len(p_tr)), 1.0)
        per_layer.append(cov.mean(axis=1))
    return np.mean(per_layer, axis=0)


def test_states_and_coverage_match_a_per_neuron_re_derivation():
    model = tiny_cnn()
    g = torch.Generator().manual_seed(1)
    x_tr, x_te = torch.randn(30, 1, 6, 6, generator=g, dtype=torch.float64), torch.randn(12, 1, 6, 6, generator=g, dtype=torch.float64) * 1.5
    det = make_detector("nac", alpha=1.5, bins=20, r=0.1)
    assert det.layer_names(model) == ["backbone.features.1", "backbone"]
    train = det.probe(model, x_tr)
    det.fit(train, torch.zeros(30, dtype=torch.long), model.head)
    want_tr, want_te = oracle_probes(model, x_tr), oracle_probes(model, x_te)
    for got, want in zip(train.values(), want_tr, strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-12)
    expected = oracle_scores(want_tr, want_te, 1.5, 20, 0.1)
    got = det.score(det.probe(model, x_te)).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert got.std() > 0 and det.state()["counts"].shape == (3 + 4, 18)


def test_plain_features_stand_for_the_penultimate_layer():
    model = tiny_cnn()
    x = torch.randn(40, 1, 6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    one = make_detector("nac", layers=1)
    probes = one.probe(model, x)
    assert list(probes) == ["backbone"]
    with torch.no_grad():
        z = model.backbone(x)
    a = make_detector("nac", layers=1).fit(probes, torch.zeros(40, dtype=torch.long), model.head)
    b = make_detector("nac", layers=1).fit(z, torch.zeros(40, dtype=torch.long), model.head)
    torch.testing.assert_close(a.score(probes), b.score(z), rtol=0, atol=0)
    with pytest.raises(DetectorError, match=r"sizes \[4\] but score got probes of sizes \[3, 4\]"):
        b.score(make_detector("nac").probe(model, x))


def test_against_pytorch_ood_nacue(monkeypatch):
    """Same model, layers, α per layer and O = r·N: with OpenOOD's bin edges patched into
    pytorch-ood, its scores are ours times −L (it sums layers and negates); with its own
    geometric edges they differ."""
    import pytorch_ood.detector.nac as pood  # a dev dependency: the comparison always runs
    torch.manual_seed(0)
    model = Classifier(TinyMLP(), nn.Linear(5, 3)).eval()
    g = torch.Generator().manual_seed(3)
    x_tr, x_te = torch.randn(80, 6, generator=g), torch.randn(30, 6, generator=g) * 2
    det = make_detector("nac", alpha=2.0, bins=16, r=0.05)
    assert det.layer_names(model) == ["backbone.features.1", "backbone"]
    det.fit(det.probe(model, x_tr), torch.zeros(80, dtype=torch.long), model.head)
    ours = det.score(det.probe(model, x_te)).numpy()
    alphas = [2.0 / s for s in det.state()["scales"].tolist()]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_tr), batch_size=32)

    def theirs() -> np.ndarray:
        peer = pood.NACUE(model, layers=[model.backbone.features[1], model.backbone], m_bins=16 - 2, alpha=alphas, o_star=4)
        return peer.fit(loader).predict(x_te).numpy()

    plain = theirs()
    monkeypatch.setattr(pood, "_bin_indices_geometric", lambda z, m: det._bins(z.double()))
    matched = theirs()
    np.testing.assert_allclose(-matched / 2, ours, rtol=0, atol=1e-6)
    assert not np.allclose(-plain / 2, ours, atol=1e-3)


def test_layer_rule_for_the_project_s_backbones():
    def clf(name, size=32, **kw):
        bb = build_backbone(name, 3, size, **kw)
        return Classifier(bb, nn.Linear(bb.num_features, 10))

    assert choose_layers(clf("resnet18"), 4) == ["backbone.layer1", "backbone.layer2", "backbone.layer3", "backbone"]
    assert choose_layers(clf("resnet18"), 2) == ["backbone.layer3", "backbone"]
    assert choose_layers(clf("small_cnn"), 4) == ["backbone.features.2", "backbone.features.5", "backbone"]
    assert choose_layers(clf("wrn40_2"), 4) == ["backbone.block1", "backbone.block2", "backbone"]
    mobile = choose_layers(clf("mobilenet_v2"), 4)
    assert mobile[-1] == "backbone" and mobile[-2] == "backbone.features.17" and len(mobile) == 4
    assert choose_layers(clf("small_cnn"), 1) == ["backbone"]
    tv = choose_layers(clf("torchvision:resnet18", size=64), 4)
    assert tv == ["backbone.net.layer1", "backbone.net.layer2", "backbone.net.layer3", "backbone"]


def test_probing_leaves_the_model_and_its_gradients_alone():
    bb = build_backbone("small_cnn", 1, 8)
    model = Classifier(bb, nn.Linear(bb.num_features, 3)).eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        probes = make_detector("nac").probe(model, x)
    assert [v.shape for v in probes.values()] == [(5, 32), (5, 64), (5, 128)]
    assert all(p.grad is None for p in model.parameters()) and not model.training


@pytest.mark.parametrize(
    "params,pattern",
    [
        ({"layers": 0}, r"detector 'nac': layers=0 must be >= 1$"),
        ({"alpha": 0.0}, r"detector 'nac': alpha=0.0 must be > 0$"),
        ({"bins": 51}, r"detector 'nac': bins=51 must be an even number >= 4$"),
        ({"r": 1.5}, r"detector 'nac': r=1.5 must be in \(0, 1\]$"),
        ({"fit_samples": 0}, r"detector 'nac': fit_samples=0 must be >= 1$"),
        ({"bins": 50.0}, r"detector 'nac': bins=50.0 must be an int$"),
    ],
)
def test_bad_parameters_are_one_line_errors_naming_them(params, pattern):
    with pytest.raises(DetectorError, match=pattern) as info:
        make_detector("nac", **params)
    assert "\n" not in str(info.value)


def test_state_restore_and_its_checks():
    model = tiny_cnn()
    x = torch.randn(30, 1, 6, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    det = make_detector("nac", r=0.2).fit(det_probes := make_detector("nac").probe(model, x), torch.zeros(30, dtype=torch.long), model.head)
    state = det.state()
    again = make_detector("nac", r=0.1).restore(state, model.head, feature_dim=4)  # r only scores
    assert not torch.equal(again.score(det_probes), det.score(det_probes))
    torch.testing.assert_close(make_detector("nac", r=0.2).restore(state, model.head).score(det_probes), det.score(det_probes), rtol=0, atol=0)
    with pytest.raises(DetectorError, match="fitted with alpha=1.0 but this detector has alpha=3.0"):
        make_detector("nac", alpha=3.0).restore(state, model.head)
    with pytest.raises(DetectorError, match=r"state counts has 6 rows"):
        make_detector("nac").restore({**state, "counts": state["counts"][:6]}, model.head)
    with pytest.raises(DetectorError, match="must be whole numbers >= 0"):
        make_detector("nac").restore({**state, "counts": state["counts"] - 0.5}, model.head)
    with pytest.raises(DetectorError, match="state sizes end with 4, but the penultimate layer has D=5"):
        make_detector("nac").restore({**state, "feature_dim": torch.tensor(5)}, nn.Linear(5, 3).double())


def test_grid_is_small_and_every_candidate_fits():
    grid = DETECTORS["nac"].grid()
    assert len(grid) == 12 and {"layers": 4, "alpha": 1.0, "r": 0.05} in grid
    model = tiny_cnn()
    x = torch.randn(20, 1, 6, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for point in grid:
        det = make_detector("nac", **point)
        det.fit(det.probe(model, x), torch.zeros(20, dtype=torch.long), model.head)
        assert torch.isfinite(det.score(det.probe(model, x))).all()


def test_trained_with_nac_saved_restored_served_and_evaluated(digits_ood, tmp_path):
    """``--detectors nac`` in training: chosen on val, saved in the checkpoint, restored by
    ``load_model_dir``, scored by the predictor as in the search; then ``evaluate_model``."""
    from ood_ray.config import TrainConfig
    from ood_ray.data.manifest import Benchmark
    from ood_ray.data.streams import eval_batches
    from ood_ray.detector_eval import evaluate_model
    from ood_ray.engine import train_local
    from ood_ray.engine.detect import Scorer
    from ood_ray.methods import get_method
    from ood_ray.serving import OODPredictor

    cfg = TrainConfig(method="softmax", data=str(digits_ood), epochs=1, num_workers=1, evaluate_test=False, detectors=["nac"], detector_fit_samples=200)
    last = train_local(cfg, tmp_path / "run")[-1]
    assert math.isfinite(last["detector_nac_val_auroc"])
    from ood_ray.checkpoint import load_model_dir

    model, meta, saved_cfg = load_model_dir(last["checkpoint_path"])
    assert meta["detector"]["name"] == "nac"
    det = model.detector
    assert det.params["fit_samples"] == 1000 and int(det.state()["num_profiled"]) <= 200
    bench = Benchmark.load(digits_ood)
    method = get_method(meta["method"], meta["method_params"])
    val = Scorer(model, method, bench, "val", 0, 1, "cpu", 256)
    expected = val.scores(det)[0]
    images = np.concatenate([x.numpy() for x, _, _ in eval_batches(bench.val, 0, 1, 256)])
    served = OODPredictor(model, meta, saved_cfg).outputs(images)["nac"]
    np.testing.assert_allclose(np.sort(served), np.sort(expected), rtol=0, atol=1e-6)  # served as float32
    table = evaluate_model(model, meta, saved_cfg, "nac-test", ["nac"], bench=bench, fit_samples=200, log_mlflow=False, out=tmp_path / "t.md")
    assert table.rows == ["method_msp", "nac"] and math.isfinite(table.metrics[names.mean_key("test", "auroc", names.ALL, "nac")])
