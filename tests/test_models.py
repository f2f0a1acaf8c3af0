"""Tests for ood_ray.models: backbone shapes, gradients, registry errors, sizes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ood_ray.models import BACKBONES, Classifier, build_backbone

NAMES = sorted(BACKBONES)
EXPECTED_FEATURES = {"small_cnn": 128, "resnet18": 512, "wrn40_2": 128, "mobilenet_v2": 1280}


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_registry_names():
    assert set(NAMES) == {"small_cnn", "resnet18", "wrn40_2", "mobilenet_v2"}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [8, 32])
def test_forward_shape_and_finite(name, channels, size):
    torch.manual_seed(0)
    m = build_backbone(name, channels, (size, size)).eval()
    assert isinstance(m.num_features, int)
    assert m.num_features == EXPECTED_FEATURES[name]
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        out = m(x)
    assert out.shape == (2, m.num_features)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_first_conv(name):
    torch.manual_seed(0)
    m = build_backbone(name, 1, 8).train()
    x = torch.randn(2, 1, 8, 8)
    m(x).pow(2).mean().backward()
    g = m.first_conv.weight.grad
    assert g is not None
    assert torch.isfinite(g).all()
    assert g.abs().sum() > 0


def test_non_square_image():
    m = build_backbone("small_cnn", 3, (8, 20)).eval()
    with torch.no_grad():
        assert m(torch.randn(2, 3, 8, 20)).shape == (2, 128)


def test_unknown_name_raises():
    with pytest.raises(ValueError, match="resnet19") as exc:
        build_backbone("resnet19", 3, 32)
    for n in NAMES:
        assert n in str(exc.value)


@pytest.mark.parametrize("channels", [0, -1])
def test_bad_channels(channels):
    with pytest.raises(ValueError, match="in_channels"):
        build_backbone("small_cnn", channels, 32)


def test_other_channel_counts_accepted():
    m = build_backbone("small_cnn", 5, 8).eval()
    with torch.no_grad():
        assert m(torch.randn(2, 5, 8, 8)).shape == (2, 128)


@pytest.mark.parametrize("size", [4, (8, 7), (7, 32)])
def test_image_too_small(size):
    with pytest.raises(ValueError, match="image_size"):
        build_backbone("small_cnn", 1, size)


def test_unknown_kwarg_raises():
    with pytest.raises(TypeError):
        build_backbone("resnet18", 3, 32, not_an_option=1)


def test_backbone_kwargs():
    assert build_backbone("small_cnn", 1, 8, width=0.5).num_features == 64
    wrn = build_backbone("wrn40_2", 3, 32, dropout=0.0)
    assert not any(isinstance(m, nn.Dropout) for m in wrn.modules())
    wrn = build_backbone("wrn40_2", 3, 32)
    drops = [m for m in wrn.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(d.p == 0.3 for d in drops)


def test_mobilenet_small_input():
    assert build_backbone("mobilenet_v2", 3, 32).first_conv.stride == (1, 1)
    assert build_backbone("mobilenet_v2", 3, 32, small_input=False).first_conv.stride == (2, 2)
    assert build_backbone("mobilenet_v2", 3, 64).first_conv.stride == (2, 2)
    m = build_backbone("mobilenet_v2", 1, 64, small_input=True)
    assert m.first_conv.stride == (1, 1) and m.first_conv.in_channels == 1


# Published sizes include a 10-class FC layer (F*10 + 10 params); the backbones
# here have no FC, so the expected counts are the published ones minus that layer:
#   ResNet-18 (CIFAR stem): 11,173,962 - (512*10 + 10) = 11,168,832
#   WRN-40-2:                2,243,546 - (128*10 + 10) =  2,242,256
def test_param_count_resnet18():
    m = build_backbone("resnet18", 3, 32)
    n = _n_params(m)
    assert n == 11_168_832
    assert 11.0e6 < n + 512 * 10 + 10 < 11.3e6
    assert n + 512 * 10 + 10 == 11_173_962


def test_param_count_wrn40_2():
    m = build_backbone("wrn40_2", 3, 32)
    n = _n_params(m)
    assert n == 2_242_256
    assert 2.2e6 < n + 128 * 10 + 10 < 2.3e6
    assert n + 128 * 10 + 10 == 2_243_546


def test_weight_init():
    m = build_backbone("resnet18", 3, 32)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0)
    std = m.first_conv.weight.std().item()
    expected = (2.0 / (64 * 9)) ** 0.5  # kaiming normal, fan_out, ReLU
    assert 0.7 * expected < std < 1.3 * expected


def test_classifier_linear_head():
    bb = build_backbone("small_cnn", 1, 8)
    clf = Classifier(bb, nn.Linear(bb.num_features, 10)).eval()
    assert clf.backbone is bb and isinstance(clf.head, nn.Linear)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        logits = clf(x)
        feats = clf.features(x)
    assert logits.shape == (3, 10)
    assert feats.shape == (3, bb.num_features)


class _TupleHead(nn.Module):
    def __init__(self, f: int, k: int) -> None:
        super().__init__()
        self.fc = nn.Linear(f, k)
        self.conf = nn.Linear(f, 1)

    def forward(self, z):
        return self.fc(z), self.conf(z)


def test_classifier_tuple_head():
    bb = build_backbone("small_cnn", 3, 8)
    clf = Classifier(bb, _TupleHead(bb.num_features, 4)).eval()
    with torch.no_grad():
        out = clf(torch.randn(2, 3, 8, 8))
    assert isinstance(out, tuple) and len(out) == 2
    assert out[0].shape == (2, 4) and out[1].shape == (2, 1)
