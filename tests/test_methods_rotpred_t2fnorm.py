"""Rotation prediction and T2FNorm: their losses and scores against re-derivations, and a short
real training run of each through the project's loop (digits-ood), loaded back as a predictor."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ood_ray.config import TrainConfig
from ood_ray.methods import get_method
from ood_ray.methods.rotpred import rotated, rotpred_score
from ood_ray.models import Classifier, build_backbone


def tiny(method_name: str, params: dict | None = None, k: int = 3):
    torch.manual_seed(0)
    m = get_method(method_name, params)
    backbone = build_backbone("small_cnn", 3, (8, 8))
    return m, Classifier(backbone, m.make_head(backbone.num_features, k))


def test_rotations_are_the_four_quarter_turns():
    x = torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).reshape(2, 1, 3, 3)
    x_rot, r = rotated(x)
    assert x_rot.shape == (8, 1, 3, 3) and r.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    img = x[1, 0].numpy()
    for k in range(4):  # numpy's rot90 on (H, W): counter-clockwise k quarter turns
        np.testing.assert_array_equal(x_rot[k * 2 + 1, 0].numpy(), np.rot90(img, k))
    with pytest.raises(ValueError, match=r"square images .* \(2, 1, 3, 4\)"):
        rotated(torch.zeros(2, 1, 3, 4))


def test_rotpred_score_matches_a_per_image_re_derivation():
    g = torch.Generator().manual_seed(1)
    n, k = 5, 7
    logits, rot_logits = torch.randn(n, k, generator=g) * 3, torch.randn(4 * n, 4, generator=g) * 2
    got = rotpred_score(logits, rot_logits).numpy()
    for i in range(n):
        p = np.exp(logits[i].double().numpy())
        p /= p.sum()
        kl = float(np.sum((1 / k) * np.log((1 / k) / p)))  # KL(u ‖ p)
        ce = []
        for r in range(4):
            q = np.exp(rot_logits[r * n + i].double().numpy())
            ce.append(-math.log(q[r] / q.sum()))
        assert got[i] == pytest.approx(kl - np.mean(ce), rel=1e-12, abs=1e-12)


def test_rotpred_step_and_eval_use_the_rotated_batch():
    m, model = tiny("rotpred", {"rot_weight": 0.5})
    x, y = torch.rand(4, 3, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 0])
    model.train()
    torch.manual_seed(3)
    res = m.training_step(model, x, y, None, {})
    torch.manual_seed(3)
    logits, rot = model(rotated(x)[0])
    want = F.cross_entropy(logits[:4], y) + 0.5 * F.cross_entropy(rot, rotated(x)[1])
    assert res.loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert set(res.logs) == {"class_loss", "rotation_loss"}
    model.eval()
    with torch.no_grad():
        out = m.eval_batch(model, x)
        alone = model(x)[0]  # eval mode: the unrotated logits do not depend on the rotated copies
    torch.testing.assert_close(out["logits"], alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["msp"], torch.softmax(alone, 1).amax(1), rtol=1e-5, atol=1e-6)
    assert out["rotpred"].shape == (4,) and m.score_names() == ["msp", "energy", "rotpred"]
    assert m.flat_output(model(x)).shape == (4, 3)


def test_t2fnorm_normalises_in_training_only_and_detectors_get_the_test_time_head():
    m, model = tiny("t2fnorm", {"tau": 0.25})
    x = torch.rand(6, 3, 8, 8) * 2 - 1
    head = model.head
    with torch.no_grad():
        z = model.features(x)
        model.train()
        train_logits = head(z)
        model.eval()
        test_logits = head(z)
    W, b = head.fc.weight, head.fc.bias
    torch.testing.assert_close(train_logits, (z / z.norm(dim=1, keepdim=True)) @ W.T / 0.25 + b)
    torch.testing.assert_close(test_logits, z @ W.T / 0.25 + b)
    lin = m.class_head(head)
    assert isinstance(lin, torch.nn.Linear) and not lin.weight.requires_grad
    torch.testing.assert_close(lin(z), test_logits)
    # features of norm 1 in training: scaling z does not change the training logits
    model.train()
    torch.testing.assert_close(head(3.0 * z), train_logits)
    with pytest.raises(ValueError, match=r"tau \(τ\)=0 must be > 0"):
        get_method("t2fnorm", {"tau": 0})


@pytest.mark.parametrize("method,params", [("rotpred", {}), ("t2fnorm", {"tau": 0.5})])
def test_trains_scores_and_serves(digits_ood, tmp_path, method, params):
    """Two epochs through the real loop, then the checkpoint through the serving predictor and
    the post-hoc detector search (a linear class head for every detector)."""
    from ood_ray.engine import train_local
    from ood_ray.serving import load_predictor

    cfg = TrainConfig(method=method, method_params=params, data=str(digits_ood), epochs=2, num_workers=1, detectors=["msp", "knn", "mahalanobis"], delta_tpr=0.95)
    last = train_local(cfg, tmp_path / "run")[-1]
    assert last["epoch"] == 2 and last["test_acc"] > 0.5, last
    spec = get_method(method, params)
    for score in spec.score_names():
        assert any(k.startswith("test_ood_") and k.endswith(f"{score}_auroc") for k in last), score
    assert 0.5 < last["test_auroc"] <= 1.0
    predictor = load_predictor(last["checkpoint_path"])
    assert predictor.meta["method"] == method and predictor.meta["detector"]["name"] in cfg.detectors
