"""The ``Method`` contract, checked for every registered method (a new method is covered at once).

Each rule here is one a method must keep for the loop, the tuner, the recorders and the serving
code to work with it without knowing its name (see ``ood_ray.methods.base.Method``).
"""

from __future__ import annotations

import math

import optuna
import pytest
import torch

from ood_ray.checkpoint import model_meta
from ood_ray.config import TrainConfig
from ood_ray.methods import METHODS, REGISTRY, Method, get_method
from ood_ray.models import Classifier, build_backbone

K, N = 3, 8
NAMES = sorted(METHODS)


def tiny_model(method: Method) -> Classifier:
    torch.manual_seed(0)
    backbone = build_backbone("small_cnn", 1, (8, 8))
    return Classifier(backbone, method.make_head(backbone.num_features, K))


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(N, 1, 8, 8, generator=g) * 2 - 1
    y = torch.arange(N) % K
    return x, y


def test_registry_names_each_class_once():
    assert len(REGISTRY) == len(METHODS) == len({e.split(":")[1] for e in REGISTRY})
    for name, cls in METHODS.items():
        assert issubclass(cls, Method) and cls.name == name and name


@pytest.mark.parametrize("name", NAMES)
def test_declared_attributes_are_consistent(name):
    cls = METHODS[name]
    m = get_method(name)
    assert set(cls.nonnegative) | set(cls.positive) <= set(cls.defaults)
    assert set(cls.labels) <= set(cls.defaults)
    low, high = cls.threshold_range
    assert math.isfinite(low) and math.isfinite(high) and low < high
    if m.params.get("delta") is not None:
        assert low <= m.params["delta"] <= high
    assert isinstance(cls.exported_output, str) and cls.exported_output.strip() and "\n" not in cls.exported_output
    assert all(isinstance(k, str) for k in cls.calibration_keys)
    assert isinstance(m.initial_state(), dict)
    names = m.score_names()
    assert m.default_score in names and m.threshold_score in names


@pytest.mark.parametrize("name", NAMES)
def test_search_space_and_posthoc_grid_pass_validation(name):
    cls = METHODS[name]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        params = cls.search_space(study.ask())
        assert set(params) <= set(cls.defaults)
        cls.check_params(params)
        TrainConfig.from_dict({"method": name, "method_params": params})  # what a trial builds
    grid = cls.posthoc_grid()
    assert grid and grid[0] is not None
    for cand in grid:
        assert set(cand) <= set(cls.defaults)
        cls.check_params(cand)


@pytest.mark.parametrize("name", NAMES)
def test_training_step_eval_and_export(name):
    m = get_method(name)
    model = tiny_model(m)
    x, y = batch()
    x_out = None
    if m.needs_outliers:
        assert m.outlier_batch(N) >= 1
        x_out = torch.rand(m.outlier_batch(N), 1, 8, 8) * 2 - 1
    else:
        assert m.outlier_batch(N) == 0
    state = m.initial_state()
    res = m.training_step(model.train(), x, y, x_out, state)
    assert res.loss.ndim == 0 and torch.isfinite(res.loss) and res.loss.requires_grad
    res.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.parameters())
    assert set(m.state_sync_keys) <= set(res.logs)
    m.update_state(state, {k: float(res.logs[k]) for k in m.state_sync_keys})
    model.eval()
    grad = torch.enable_grad() if m.eval_needs_grad else torch.no_grad()
    with grad:
        out = m.eval_batch(model, x)
    assert out["logits"].shape == (N, K)
    low, high = m.threshold_range
    for score in m.score_names():
        assert out[score].shape == (N,), score
        assert torch.isfinite(out[score]).all(), score
    thr = out[m.threshold_score]
    assert ((thr >= low - 1e-6) & (thr <= high + 1e-6)).all(), "the threshold score leaves threshold_range"
    with torch.no_grad():
        flat = m.flat_output(model(x))
        logits = m.logits(model(x))
    assert isinstance(flat, torch.Tensor) and flat.shape[0] == N and flat.ndim == 2
    assert torch.allclose(flat[:, :K], logits), "the exported output starts with the class logits"


@pytest.mark.parametrize("name", NAMES)
def test_calibrate_returns_declared_keys_and_temperature(name):
    m = get_method(name)
    model = tiny_model(m).eval()
    x, y = batch(1)
    with torch.no_grad():
        logits = m.logits(model(x))
    logs = m.calibrate(model, logits, y)
    assert set(logs) <= set(m.calibration_keys), f"calibrate() returned undeclared keys: {set(logs) - set(m.calibration_keys)}"
    t = m.temperature(model)
    assert t is None or (math.isfinite(t) and t > 0)
    if "temperature" in logs:
        assert t == pytest.approx(logs["temperature"], rel=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_model_card_comes_from_the_class(name):
    cfg = TrainConfig.from_dict({"method": name})
    meta = model_meta(cfg, ["a", "b", "c"], (8, 8), "L")
    cls = METHODS[name]
    assert meta["exported_output"] == cls.exported_output
    assert meta["threshold_score"] == get_method(name).threshold_score and meta["default_score"] == get_method(name).default_score


@pytest.mark.parametrize("name", [n for n in NAMES if "delta" in METHODS[n].defaults])
def test_delta_is_checked_against_the_threshold_range(name):
    cls = METHODS[name]
    low, high = cls.threshold_range
    for bad in (low - 0.1, high + 0.1):
        with pytest.raises(ValueError, match="delta="):
            cls.check_params({"delta": bad})
    cls.check_params({"delta": low})
    cls.check_params({"delta": high})
