"""Backbones (feature extractors) and the generic backbone + head classifier.

Backbones map ``N x C x H x W`` float images to ``N x F`` features (after global
average pooling) and carry ``num_features == F``; they never output logits.

Registry (``BACKBONES``):

============== ======================================================== =========
name           network                                                  features
============== ======================================================== =========
small_cnn      3 conv-BN-ReLU layers + one max-pool (``width`` mult.)   128*width
resnet18       ResNet-18, CIFAR stem (3x3 conv stride 1, no max-pool)   512
wrn40_2        Wide ResNet 40-2, pre-activation, ``dropout`` (0.3)      128
mobilenet_v2   torchvision MobileNetV2 features (``width_mult``,        1280
               ``small_input``: first conv stride 1 when the image is
               smaller than 64 px, automatic by default)
============== ======================================================== =========

``torchvision:<name>`` and ``timm:<name>`` build any classification model of those libraries
without its last linear layer (``models.external``); their preprocessing (input size, resize and
crop, mean and std) comes from the model's default weights (``models.preprocess``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .backbones import (
    AvgMaxPool,
    CifarResNet,
    MobileNetV2Features,
    SmallCNN,
    WideResNet,
    init_weights,
    mobilenet_v2,
    resnet18,
    small_cnn,
    wrn40_2,
)
from .external import ExternalBackbone, ModelSpecError, is_external
from .preprocess import Preprocess, from_timm, from_torchvision

__all__ = [
    "BACKBONES",
    "ExternalBackbone",
    "ModelSpecError",
    "Preprocess",
    "is_external",
    "model_preprocess",
    "check_backbone_name",
    "MIN_IMAGE_SIZE",
    "Classifier",
    "build_backbone",
    "init_weights",
    "SmallCNN",
    "CifarResNet",
    "WideResNet",
    "MobileNetV2Features",
]

MIN_IMAGE_SIZE = 8

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": small_cnn,
    "resnet18": resnet18,
    "wrn40_2": wrn40_2,
    "mobilenet_v2": mobilenet_v2,
}


def _check_image_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, bool):
        raise ValueError(f"image_size must be an int or (H, W), got {image_size!r}")
    if isinstance(image_size, int):
        hw = (image_size, image_size)
    else:
        try:
            hw = tuple(image_size)
        except TypeError:
            raise ValueError(f"image_size must be an int or (H, W), got {image_size!r}") from None
        if len(hw) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in hw):
            raise ValueError(f"image_size must be an int or (H, W), got {image_size!r}")
    if min(hw) < MIN_IMAGE_SIZE:
        raise ValueError(
            f"image_size {image_size!r} is too small: height and width must be >= {MIN_IMAGE_SIZE}"
        )
    return hw  # type: ignore[return-value]


def check_backbone_name(name: str) -> None:
    """Refuse a backbone name that cannot be built (ValueError naming it and the choices)."""
    if is_external(name):
        from .external import check_name

        check_name(name)
    elif not isinstance(name, str) or name not in BACKBONES:
        raise ValueError(
            f"unknown backbone {name!r}; choose one of: {', '.join(sorted(BACKBONES))}, torchvision:<name>, timm:<name>"
        )


def model_preprocess(name: str, channels: int, stored_size, input_size: int | None = None, weights_tag: str = "DEFAULT") -> Preprocess:
    """The preprocessing of backbone ``name`` for images of ``channels`` stored at ``stored_size``:
    the transforms of a torchvision model's ``weights_tag`` weights (``DEFAULT``, ``IMAGENET1K_V1``...)
    or a timm model's data config (at ``input_size`` when given), else ``x / 127.5 - 1`` at the
    stored size (resized to ``input_size`` when given)."""
    if name.startswith("torchvision:"):
        from torchvision.models import get_model_weights

        try:
            enum = get_model_weights(name.partition(":")[2])
        except (ValueError, KeyError):  # a model torchvision publishes no weights for
            enum = None
        if enum is not None:
            if weights_tag not in ("DEFAULT", *enum.__members__):
                raise ValueError(f"{enum.__name__} has no entry {weights_tag!r}; choose from DEFAULT, {', '.join(enum.__members__)}")
            return from_torchvision(enum[weights_tag], channels, input_size)
        size = input_size or 224
        return Preprocess(3, size=(size, size), resize=max(size, round(size * 256 / 224)), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), train_crop="random-resized", source="imagenet-default")
    if name.startswith("timm:"):
        from .external import full_model

        with torch.device("meta"):  # the data config only: no weights are allocated
            net = full_model(name)
        return from_timm(net, name, input_size)
    return Preprocess.scaled(channels, size=(input_size, input_size) if input_size else None)


def build_backbone(
    name: str, in_channels: int, image_size: tuple[int, int] | int, **kwargs: Any
) -> nn.Module:
    """Build the backbone registered as ``name``.

    ``in_channels`` is any positive int (1 for grayscale, 3 for RGB, ...);
    ``image_size`` is ``H`` (square) or ``(H, W)``, each at least 8. Extra
    keyword arguments go to the backbone constructor (``width`` for
    ``small_cnn``, ``dropout`` for ``wrn40_2``, ``width_mult`` / ``small_input``
    for ``mobilenet_v2``, ``zero_init_residual`` for ``resnet18``); unknown
    ones raise ``TypeError``.
    """
    check_backbone_name(name)
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels <= 0:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    hw = _check_image_size(image_size)
    pooling = kwargs.pop("pooling", "avg")
    if is_external(name):
        return ExternalBackbone(name, in_channels, hw, pooling=pooling, **kwargs)
    net = BACKBONES[name](in_channels, hw, **kwargs)
    if pooling != "avg":
        net.pool = AvgMaxPool()
        net.num_features *= 2
    return net


class Classifier(nn.Module):
    """``head(backbone(x))``; the head's output (tensor or tuple) is returned as is.

    ``detector``: the fitted post-hoc detector (``ood_ray.detectors``) a checkpoint carries, set
    when it is loaded (None when it has none); it is not a module and not in the state_dict.
    ``preprocess``: how uint8 images become its input (``Preprocess``; the project's ``x / 127.5 - 1``
    by default); ``dropout``: the probability of zeroing a feature before the head while training.
    """

    detector = None
    weights_record = None  # the pretrained weights the backbone started from (``WeightsFile.record()``), when any

    def __init__(self, backbone: nn.Module, head: nn.Module, preprocess: Preprocess | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.preprocess = preprocess
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def num_features(self) -> int:
        return int(self.backbone.num_features)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features ``N x num_features``."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> Any:
        return self.head(self.dropout(self.backbone(x)))
